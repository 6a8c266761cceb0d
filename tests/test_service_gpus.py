"""Jobs on several GPU slots: reservation in the queue, the torchrun command and its environment,
the exit codes of the ranks, the refusal at submit time, and the world size in the API and page."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
import types
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import qlora.service.process
import qlora.service.runner
from qlora.errors import EXIT_INTERRUPTED
from qlora.service.app import Settings, create_app
from qlora.service.process import child_environment, shepherded, train_command
from qlora.service.runner import Runner
from qlora.service.store import Store
from qlora.service.submission import job_folder
from tests.service_server import TOKEN, Server, browse, populate_root, tiny_job, wait_for_state, wait_until

AUTH = {"Authorization": f"Bearer {TOKEN}"}


class FakeProcess:
    """subprocess.Popen for the scheduler, without a process: a test says when it ends."""

    started: list["FakeProcess"] = []

    def __init__(self, command, **options):
        self.command, self.options = command, options
        self.returncode, self.signals = None, []
        self.pid = 40000 + len(FakeProcess.started)
        FakeProcess.started.append(self)

    def poll(self):
        return self.returncode

    def send_signal(self, number):
        self.signals.append(number)

    def wait(self, timeout=None):
        return self.returncode


@pytest.fixture
def fake_runner(tmp_path, monkeypatch):
    """A runner on two slots whose children are FakeProcesses; `add` queues a job with its folder."""
    FakeProcess.started = []
    kept = {name: getattr(subprocess, name) for name in ("DEVNULL", "STDOUT", "TimeoutExpired")}
    monkeypatch.setattr(qlora.service.runner, "subprocess", types.SimpleNamespace(**kept, Popen=FakeProcess))
    store = Store(tmp_path / "service.db")
    runner = Runner(store, tmp_path, ["0", "1"], stop_grace_s=60, echo=lambda line: None)

    def add(job_id: str, gpus: int, priority: int = 0):
        job_folder(tmp_path, job_id).mkdir(parents=True)
        return store.add(job_id, None, priority, 10, gpus=gpus)

    def tick() -> None:  # one turn of the scheduler's loop
        runner.reap()
        runner.schedule()

    yield types.SimpleNamespace(runner=runner, store=store, add=add, tick=tick, root=tmp_path)
    store.close()


def states(store: Store, *job_ids: str) -> list[str]:
    return [store.get(job_id).state for job_id in job_ids]


def test_a_two_gpu_job_waits_for_two_free_slots_and_the_one_gpu_job_behind_it_does_not_starve_it(fake_runner):
    store, tick = fake_runner.store, fake_runner.tick
    fake_runner.add("a", gpus=1)
    fake_runner.add("b", gpus=2)
    fake_runner.add("c", gpus=1)
    tick()
    (first,) = FakeProcess.started
    # b heads the queue and does not fit in the one free slot: it reserves it, so c may not take it.
    assert states(store, "a", "b", "c") == ["running", "queued", "queued"] and store.get("a").slot == "0"
    assert fake_runner.runner.free_slots() == ["1"]
    tick()
    assert len(FakeProcess.started) == 1

    first.returncode = 0
    tick()
    assert states(store, "a", "b", "c") == ["succeeded", "running", "queued"]
    big = store.get("b")
    assert (big.slot, big.gpus) == ("0,1", 2) and fake_runner.runner.free_slots() == []
    assert FakeProcess.started[1].options["env"]["CUDA_VISIBLE_DEVICES"] == "0,1"

    FakeProcess.started[1].returncode = EXIT_INTERRUPTED  # an outside SIGTERM: it resumes, on two slots again
    tick()
    assert states(store, "b", "c") == ["running", "queued"] and store.get("b").attempts == 2
    FakeProcess.started[2].returncode = 0
    tick()
    # Both slots are released at the end: c starts, and one slot stays free.
    assert states(store, "b", "c") == ["succeeded", "running"]
    assert store.get("b").slot is None and store.get("c").slot == "0" and fake_runner.runner.free_slots() == ["1"]


def test_a_higher_priority_job_still_goes_first_and_one_larger_than_the_service_fails_instead_of_blocking(
    fake_runner,
):
    store, tick = fake_runner.store, fake_runner.tick
    fake_runner.add("a", gpus=1)
    tick()
    fake_runner.add("b", gpus=2)
    fake_runner.add("c", gpus=3)  # queued by a service that had 3 slots, before a restart with --gpus 2
    fake_runner.add("d", gpus=1, priority=5)
    tick()
    assert states(store, "a", "b", "c", "d") == ["running", "queued", "failed", "running"]
    assert store.get("c").error == "gpus: 3: this service has 2 GPU slot(s) now"
    for process in FakeProcess.started:
        process.returncode = 0
    tick()
    assert states(store, "b") == ["running"]


def test_the_command_is_plain_qlora_train_for_one_gpu_and_nproc_on_both_slots_for_two(tmp_path):
    job = str(tmp_path / "job.yaml")
    assert train_command(job, 1) == [sys.executable, "-m", "qlora.cli", "train", job]
    assert train_command(job, 2) == [sys.executable, "-m", "qlora.cli", "train", job, "--nproc", "2"]
    assert shepherded(["x"]) == [sys.executable, "-m", "qlora.service.shepherd", "x"]
    assert child_environment("0,1")["CUDA_VISIBLE_DEVICES"] == "0,1"


@pytest.mark.slow
def test_two_ranks_under_real_torchrun_cancel_with_75_fail_with_their_error_and_stop_with_the_service(
    tmp_path, monkeypatch
):
    """The service's part of a 2-GPU job with the real launcher (CPU), each rank a stub of `qlora train`."""
    monkeypatch.setattr(qlora.service.process, "CLI_MODULE", "tests.rank_stub")
    monkeypatch.setenv("QLORA_TEST_RANK_STUB", "wait")
    store = Store(tmp_path / "service.db")
    runner = Runner(store, tmp_path, ["0", "1"], stop_grace_s=60, poll_s=0.05, echo=lambda line: None)
    runner.start()

    def submit(job_id: str):
        folder = job_folder(tmp_path, job_id)
        folder.mkdir(parents=True)
        (folder / "job.yaml").write_text("{}\n")
        store.add(job_id, None, 0, 10, gpus=2)
        runner.wake.set()
        return folder

    def seen(folder: Path) -> list[dict]:
        paths = [folder / f"rank-{rank}.json" for rank in (0, 1)]
        wait_until(lambda: all(path.exists() for path in paths), "both ranks to start", seconds=120)
        return [json.loads(path.read_text()) for path in paths]

    def settled(job_id: str, *wanted: str):
        return wait_until(lambda: store.get(job_id).state in wanted and store.get(job_id), job_id, seconds=120)

    try:
        folder = submit("cancelled")
        ranks = seen(folder)
        assert [(rank["RANK"], rank["LOCAL_RANK"], rank["WORLD_SIZE"]) for rank in ranks] == [
            ("0", "0", "2"),
            ("1", "1", "2"),
        ]
        assert {rank["CUDA_VISIBLE_DEVICES"] for rank in ranks} == {"0,1"}
        assert ranks[0]["argv"] == ["train", str(folder / "job.yaml")] and ranks[0]["MASTER_PORT"]
        assert runner.cancel("cancelled") == "cancelling"
        job = settled("cancelled", "cancelled", "failed", "succeeded")
        assert (job.state, job.exit_code, job.slot) == ("cancelled", EXIT_INTERRUPTED, None)
        assert (folder / "log.txt").read_text().count("interrupted: stopped on request") == 2  # both ranks

        monkeypatch.setenv("QLORA_TEST_RANK_STUB", "exit:3")
        submit("failed")
        job = settled("failed", "failed", "succeeded", "cancelled")
        assert (job.exit_code, job.error) == (3, "data.train: files/x.jsonl:3: not valid JSON")

        monkeypatch.setenv("QLORA_TEST_RANK_STUB", "wait")
        seen(submit("interrupted"))
    finally:
        runner.stop()  # the service stops: the job's ranks get SIGTERM, exit 75, and it resumes at the next start
    job = store.get("interrupted")
    assert (job.state, job.exit_code) == ("interrupted", EXIT_INTERRUPTED)
    store.close()


# --------------------------------------------------------------------------- submitting and showing


@pytest.fixture
def service_root(tmp_path):
    """A root whose service.db already holds a finished job on two GPUs (and one from before gpus existed)."""
    with sqlite3.connect(tmp_path / "service.db") as database:  # the schema of a service from before `gpus`
        database.execute(
            "CREATE TABLE jobs (id TEXT PRIMARY KEY, name TEXT, state TEXT NOT NULL, priority INTEGER NOT NULL"
            " DEFAULT 0, created REAL NOT NULL, started REAL, finished REAL, total_steps INTEGER, attempts INTEGER"
            " NOT NULL DEFAULT 0, exit_code INTEGER, error TEXT, pid INTEGER, slot TEXT, cancel_requested INTEGER"
            " NOT NULL DEFAULT 0)"
        )
        database.execute("INSERT INTO jobs (id, state, created) VALUES ('20261201-000000-000000', 'succeeded', 1)")
    store = Store(tmp_path / "service.db")
    store.add("20261201-000001-abcdef", "wide", 0, 4, gpus=2)
    store.transition("20261201-000001-abcdef", ("queued",), "succeeded", attempts=1, exit_code=0)
    store.close()
    return tmp_path


def test_more_gpus_than_slots_is_refused_at_submit_and_the_api_shows_each_jobs_gpus(service_root):
    client = TestClient(create_app(Settings(root=service_root, token=TOKEN, slots=["0", "1"])))
    jobs_before = list(service_root.glob("jobs/*"))
    response = client.post("/v1/jobs", json={"config": tiny_job(2), "gpus": 3}, headers=AUTH)
    assert (response.status_code, response.json()["detail"]) == (
        400,
        "gpus: 3: this service has 2 GPU slot(s) (qlora serve --gpus)",
    )
    yaml_body = {**AUTH, "Content-Type": "application/yaml"}
    response = client.post("/v1/jobs?gpus=4", content="model: {}\n", headers=yaml_body)
    assert response.status_code == 400 and response.json()["detail"].startswith("gpus: 4: this service has 2 ")
    response = client.post("/v1/jobs", json={"config": tiny_job(2), "gpus": 0}, headers=AUTH)
    assert response.status_code == 400 and response.json()["detail"].startswith("gpus: Input should be greater")
    assert list(service_root.glob("jobs/*")) == jobs_before  # refused before anything was written

    job = client.get("/v1/jobs/20261201-000001-abcdef", headers=AUTH).json()
    assert (job["gpus"], job["state"], job["name"]) == (2, "succeeded", "wide")
    listed = {job["id"]: job["gpus"] for job in client.get("/v1/jobs", headers=AUTH).json()["jobs"]}
    assert listed == {"20261201-000000-000000": 1, "20261201-000001-abcdef": 2}  # an old record is a 1-GPU job
    submit = client.get("/openapi.json").json()["paths"]["/v1/jobs"]["post"]
    assert submit["requestBody"]["content"]["application/json"]["schema"]["properties"]["gpus"]["minimum"] == 1
    assert "gpus" in [parameter["name"] for parameter in submit["parameters"]]  # for a YAML body


@pytest.mark.slow
def test_the_page_shows_the_world_size_of_a_job(service_root, tmp_path):
    service = Server(service_root, "--gpus", "2").start()
    try:
        page = browse(service, "20261201-000001-abcdef", tmp_path)
    finally:
        service.stop()
    row = re.search(r'<tr data-job="20261201-000001-abcdef"[^>]*>(.*?)</tr>', page.dom).group(1)
    assert '<td class="gpus">2</td>' in row and "<td>wide</td>" in row
    assert re.search(r'<span id="job-gpus" data-gpus="2">2 GPUs</span>', page.dom)
    assert "0 of 2 slot(s) busy" in page.dom


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_a_two_gpu_job_trains_through_the_service_survives_a_restart_and_leaves_an_adapter(tmp_path, tiny_model_dir):
    """A real 2-process job (gloo on the CPU slots) on the tiny model: stopped with the service mid-run,
    resumed at the next start, finished with one adapter written by rank 0."""
    root = tmp_path / "root"
    root.mkdir()
    populate_root(root, tiny_model_dir)
    service = Server(root, "--gpus", "2", step_delay=0.3).start()
    try:
        with service.client() as client:
            response = client.post("/v1/jobs", json={"config": tiny_job(8), "gpus": 2, "name": "ddp"})
            assert response.status_code == 201, response.text
            job_id = response.json()["id"]
            wait_until(lambda: client.get(f"/v1/jobs/{job_id}").json()["step"] >= 2, "two steps", service.process)
            running = client.get(f"/v1/jobs/{job_id}").json()
            # No GPU here: the service's two slots are CPU slots, which hand the ranks no GPU.
            assert (running["state"], running["gpus"], running["slot"]) == ("running", 2, "cpu0,cpu1")
        service.stop()
        with sqlite3.connect(root / "service.db") as database:
            state = database.execute("SELECT state, exit_code FROM jobs WHERE id = ?", (job_id,)).fetchone()
        assert state == ("interrupted", EXIT_INTERRUPTED)

        service.start()
        with service.client() as client:
            finished = wait_for_state(client, job_id, ("succeeded", "failed", "cancelled"), service)
            assert (finished["state"], finished["gpus"], finished["attempts"]) == ("succeeded", 2, 2), finished
            assert finished["step"] == 8 and finished["adapter"]
            assert client.get(f"/v1/jobs/{job_id}/adapter").status_code == 200
    finally:
        service.stop()
    output = root / "jobs" / job_id / "output"
    assert (output / "adapter_model.safetensors").exists() and (output / "adapter_config.json").exists()
    log = (root / "jobs" / job_id / "log.txt").read_text()
    assert log.count("resuming from") == 1
    assert log.count("trainable parameters:") == 2  # once per attempt: rank 0 alone prints
