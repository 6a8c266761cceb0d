"""`qlora serve` end to end: a real server on 127.0.0.1, real `qlora train` subprocesses on the
tiny model (and the demo model), real HTTP. One server is shared by the module; the SIGKILL
test runs its own."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import sqlite3
import tarfile
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import yaml

from qlora.config import load_config
from qlora.errors import EXIT_INTERRUPTED, ConfigError
from qlora.job.run import run_job
from qlora.output_dir import in_use
from tests.browser import Browser
from tests.service_server import (
    ROOT,
    TOKEN,
    Server,
    browse,
    populate_root,
    sha256,
    tiny_job,
    wait_for_state,
    wait_until,
)

pytestmark = pytest.mark.slow
MAX_UPLOAD = 2 * 2**20


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("service") / "root"
    root.mkdir()
    populate_root(root, tiny_model_dir)
    # Slow steps (0.1 s per forward) leave time to cancel a job mid-run.
    service = Server(root, "--gpus", "1", "--max-upload-mb", str(MAX_UPLOAD / 2**20), step_delay=0.1).start()
    yield service
    service.stop()
    print(f"service log: {service.log}")


@pytest.fixture(scope="module")
def client(server):
    with server.client() as client:
        yield client


@pytest.fixture(scope="module")
def reference_adapter(server, tmp_path_factory):
    """sha256 of the 8-step tiny job's adapter run in-process, undisturbed, outside the service."""
    folder = tmp_path_factory.mktemp("reference")
    job = tiny_job(8)
    job["model"]["name_or_path"] = str(server.root / "files" / "tiny-model")
    job["data"].update(
        train=str(server.root / "files/tiny/train.jsonl"), eval=str(server.root / "files/tiny/eval.jsonl")
    )
    job["output"]["dir"] = str(folder / "out")
    (folder / "job.yaml").write_text(yaml.safe_dump(job))
    run_job(load_config(folder / "job.yaml"), echo=lambda line: None)
    return sha256(folder / "out" / "adapter_model.safetensors")


def submit(client, config, **fields) -> str:
    response = client.post("/v1/jobs", json={"config": config, **fields})
    assert response.status_code == 201, response.text
    assert response.json()["state"] == "queued"
    return response.json()["id"]


def read_events(client, job_id, last_event_id=None) -> list[tuple[str, dict]]:
    events, event = [], None
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((event, json.loads(line.removeprefix("data: "))))
    return events


# --------------------------------------------------------------------------- the demo job


@pytest.fixture(scope="module")
def demo_job(server, client):
    """The demo config (embedded model and data, uploaded through the files endpoint), 4 steps, submitted as YAML."""
    demo = ROOT / "qlora" / "demo"
    for source, name in [
        *((path, f"demo-model/{path.name}") for path in (demo / "model").iterdir()),
        (demo / "data" / "train.jsonl", "demo/train.jsonl"),
        (demo / "data" / "eval.jsonl", "demo/eval.jsonl"),
    ]:
        response = client.put(f"/v1/files/{name}", content=source.read_bytes())
        assert response.status_code == 201, response.text
        assert response.json()["sha256"] == sha256(source)
    config = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    config["model"]["name_or_path"] = "files/demo-model"
    config["data"].update(train="files/demo/train.jsonl", eval="files/demo/eval.jsonl")
    config["train"].update(max_steps=4, eval_every=None, eval_exact_match=0, save_every=2)
    response = client.post(
        "/v1/jobs?priority=5&name=demo", content=yaml.safe_dump(config), headers={"Content-Type": "application/yaml"}
    )
    assert response.status_code == 201, response.text
    return response.json()["id"]


def test_demo_job_streams_its_events_succeeds_and_its_adapter_loads_with_plain_peft(server, client, demo_job, tmp_path):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    events = read_events(client, demo_job)
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "end" and events[-1][1]["state"] == "succeeded"
    assert [row["step"] for kind, row in events if kind == "metrics"] == [0, 1, 2, 3, 4]
    logs = [data["line"] for kind, data in events if kind == "log"]
    assert any(line.startswith("trainable parameters: 155,648") for line in logs)

    # A client that reconnects with Last-Event-ID (byte offsets in metrics.jsonl and log.txt) gets what it missed only.
    folder = server.root / "jobs" / demo_job
    two_rows = sum(len(line) + 1 for line in (folder / "output/metrics.jsonl").read_bytes().split(b"\n")[:2])
    log_size = (folder / "log.txt").stat().st_size
    resumed = read_events(client, demo_job, f"{two_rows}-{log_size}")
    assert [row["step"] for kind, row in resumed if kind == "metrics"] == [2, 3, 4]
    assert [kind for kind, _ in resumed if kind == "log"] == [] and resumed[-1][0] == "end"
    resynced = read_events(client, demo_job, f"{two_rows - 3}-{log_size}")  # not a line start: from the top
    assert [row["step"] for kind, row in resynced if kind == "metrics"] == [0, 1, 2, 3, 4]

    job = client.get(f"/v1/jobs/{demo_job}").json()
    assert (job["state"], job["step"], job["total_steps"], job["exit_code"], job["name"]) == (
        "succeeded",
        4,
        4,
        0,
        "demo",
    )
    assert job["eval_loss"] < 8.58  # the base's eval loss before training is 8.58
    assert [adapter["job"] for adapter in client.get("/v1/adapters").json()["adapters"]] == [demo_job]

    response = client.get(f"/v1/jobs/{demo_job}/adapter")
    assert response.status_code == 200 and response.headers["content-type"] == "application/gzip"
    with tarfile.open(fileobj=io.BytesIO(response.content)) as archive:
        names = archive.getnames()
        archive.extractall(tmp_path, filter="data")
    assert f"{demo_job}/adapter_model.safetensors" in names and not any("checkpoints" in name for name in names)
    adapter = tmp_path / demo_job
    base = AutoModelForCausalLM.from_pretrained(str(ROOT / "qlora/demo/model"), dtype=torch.float32)
    prompt = torch.tensor([[1, 2, 3, 4, 5, 6]])
    before = base(prompt).logits
    plain = PeftModel.from_pretrained(base, str(adapter))
    saved = load_file(adapter / "adapter_model.safetensors")
    loaded = {name: tensor for name, tensor in plain.state_dict().items() if "lora_" in name}
    assert len(loaded) == len(saved) > 0
    for name, tensor in saved.items():
        torch.testing.assert_close(loaded[name.replace(".weight", ".default.weight")], tensor, rtol=0, atol=0)
    assert (plain(prompt).logits - before).abs().max() > 1e-3


def test_the_web_page_shows_the_job_and_its_loss_curve(server, client, demo_job, tmp_path):
    wait_for_state(client, demo_job, ("succeeded",), server)
    page = browse(server, demo_job, tmp_path, screenshot=True)
    row = re.search(rf'<tr data-job="{demo_job}"[^>]*>(.*?)</tr>', page.dom).group(1)
    assert '<td class="state succeeded">succeeded</td>' in row and "<td>demo</td>" in row and "<td>4/4</td>" in row
    assert 'id="job-state" class="state succeeded"' in page.dom
    assert page.points("loss-path") == 4 and page.points("eval-path") == 2  # steps 1-4; evals at 0 and 4
    assert server.token not in page.dom
    print(f"screenshot of the service page: {page.screenshot}")
    assert page.screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and page.screenshot.stat().st_size > 20_000


def test_the_page_endpoints_answer_the_jobs_numbers_and_refuse_bad_input_in_one_line(server, client, demo_job):
    wait_for_state(client, demo_job, ("succeeded",), server)
    record = client.get(f"/v1/jobs/{demo_job}").json()
    # The demo config says output.dir: ../runs/demo, which the service does not use: the record says so.
    assert record["notes"] == [
        f"output.dir: '../runs/demo' is not used: the output goes to jobs/{demo_job}/output "
        f"(download the adapter with GET /v1/jobs/{demo_job}/adapter)"
    ]
    summary = client.get(f"/v1/jobs/{demo_job}/summary").json()
    assert (summary["base"], summary["lora"], summary["learning_rate"]) == (
        "files/demo-model",
        {"r": 16, "alpha": 32, "dropout": 0.05},
        2e-3,
    )
    assert summary["quantization"] == {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"}
    assert (summary["step"], summary["total_steps"], summary["finished"]) == (4, 4, True)
    output = server.root / "jobs" / demo_job / "output"
    assert summary["adapter_bytes"] == (output / "adapter_model.safetensors").stat().st_size
    assert summary["peak_memory_bytes"] > 0 and summary["supervised_tokens_per_s"] > 0 and summary["duration_s"] > 0
    assert 8.5 < summary["initial_eval_loss"] < 8.7 and summary["final_eval_loss"] == record["eval_loss"]
    assert [row["step"] for row in client.get(f"/v1/jobs/{demo_job}/metrics").json()["rows"]] == [0, 1, 2, 3, 4]
    config = yaml.safe_load(client.get(f"/v1/jobs/{demo_job}/config").json()["yaml"])
    assert "output" not in config and config["model"]["name_or_path"] == "files/demo-model"
    assert config["data"]["train"] == "files/demo/train.jsonl" and config["train"]["max_steps"] == 4

    for path in ("summary", "metrics", "config"):
        response = client.get(f"/v1/jobs/20261123-000000-abcdef/{path}")
        assert (response.status_code, response.json()) == (404, {"detail": "no job 20261123-000000-abcdef"})
    assert client.get("/v1/files/demo/train.jsonl").json()["text"].startswith('{"')
    assert client.put("/v1/files/binary/bytes.bin", content=b"\xff\xfe\x00").status_code == 201
    for path, status, detail in [
        ("nothing.yaml", 404, "path: nothing.yaml: no such file under files/"),
        ("demo", 400, "path: demo: is a folder"),
        ("..%2Fservice.db", 400, "path: ../service.db: '..' is refused; give a path inside the service root"),
        ("binary/bytes.bin", 400, "path: binary/bytes.bin: not a UTF-8 text file"),
        (
            "demo-model/model.safetensors",
            400,
            "path: demo-model/model.safetensors: 1743136 bytes is over the limit of 1048576 bytes",
        ),
    ]:
        response = client.get(f"/v1/files/{path}")
        assert (response.status_code, response.json()) == (status, {"detail": detail}), path


def test_the_page_submits_shows_the_400_runs_the_job_on_a_log_axis_and_compares_two_jobs(
    server, client, demo_job, tmp_path
):
    wait_for_state(client, demo_job, ("succeeded",), server)
    job_file = tiny_job(6)
    job_file["model"]["name_or_path"] = "PICK_MODEL"
    job_file["data"]["train"] = "files/page/train.jsonl"
    job_file["train"]["max_stepz"] = job_file["train"].pop("max_steps")
    shots = []
    with Browser(tmp_path / "browser") as page:
        page.open(f"{server.url}/#token={server.token}&job={demo_job}")
        summary = "document.querySelector('#summary dd[data-key=\"{}\"]').textContent"
        page.wait_for("document.querySelectorAll('#summary dd').length === 12", "the demo job's summary")
        assert page.run(summary.format("base")) == "files/demo-model"
        assert page.run(summary.format("quantization")) == "4-bit nf4, double quant, compute float32"
        assert page.run(summary.format("lora")) == "r=16, alpha=32, dropout 0.05"
        assert page.run(summary.format("learning_rate")) == "0.002"
        assert page.run(summary.format("steps")) == "4 of 4"
        assert page.run(summary.format("eval_loss")).startswith("8.58")
        assert page.run(summary.format("adapter")).endswith("KiB") and "(" in page.run(summary.format("peak_memory"))

        # Uploads: the data and a job file into files/page/, listed at once; a second time is refused.
        rows = json.dumps((server.root / "files/tiny/train.jsonl").read_text())
        upload = f"""(() => {{
            const transfer = new DataTransfer();
            transfer.items.add(new File([{rows}], "train.jsonl"));
            transfer.items.add(new File([{json.dumps(yaml.safe_dump(job_file))}], "job.yaml"));
            document.getElementById("upload-input").files = transfer.files;
            document.getElementById("upload-folder").value = "page";
            document.getElementById("upload-button").click();
        }})()"""
        page.run(upload)
        page.wait_for("!!document.querySelector('button.path[data-path=\"files/page/job.yaml\"]')", "the uploads")
        assert page.run("document.getElementById('upload-result').textContent").startswith(
            "uploaded files/page/train.jsonl"
        )
        page.run(upload)
        page.wait_for("document.getElementById('upload-result').textContent.includes('already exists')", "a 409")
        assert (server.root / "files/page/train.jsonl").read_bytes() == (
            server.root / "files/tiny/train.jsonl"
        ).read_bytes()

        # Prefill from a finished job, then from the uploaded file; pick the model from the root's list.
        prefill = "(() => {{ $('prefill').value = '{}'; $('prefill-load').click(); }})()"
        page.run(prefill.format(f"job:{demo_job}"))
        page.wait_for("document.getElementById('editor').value.includes('name_or_path: files/demo-model')", "a config")
        page.wait_for(
            "[...document.getElementById('prefill').options].some((o) => o.value === 'file:files/page/job.yaml')",
            "the option",
        )
        page.run(prefill.format("file:files/page/job.yaml"))
        page.wait_for("document.getElementById('editor').value.includes('PICK_MODEL')", "the uploaded config")
        page.run("""(() => {
            const editor = document.getElementById("editor");
            const at = editor.value.indexOf("PICK_MODEL");
            editor.setSelectionRange(at, at + "PICK_MODEL".length);
            document.querySelector('button.path[data-path="files/tiny-model"]').click();
            document.getElementById("submit-name").value = "from-the-page";
            document.getElementById("submit-priority").value = "3";
            document.getElementById("submit-button").click();
        })()""")
        error = page.wait_for(
            "!document.getElementById('submit-error').hidden && document.getElementById('submit-error').textContent",
            "the 400",
        )
        assert error.startswith("jobs/") and error.endswith(
            ": train.max_stepz: unknown key (did you mean 'train.max_steps'?)"
        )
        shots.append(page.screenshot(tmp_path / "page-1-validation-error.png"))

        page.run("""(() => {
            const editor = document.getElementById("editor");
            editor.value = editor.value.replace("max_stepz", "max_steps");
            document.getElementById("submit-button").click();
        })()""")
        job_id = page.wait_for("document.getElementById('submit-result').dataset.job", "the 201")
        assert page.run("document.getElementById('submit-error').hidden")
        assert "is not used: the output goes to jobs/" in page.run(
            "document.getElementById('submit-result').textContent"
        )
        record = client.get(f"/v1/jobs/{job_id}").json()
        assert (record["name"], record["priority"], record["total_steps"]) == ("from-the-page", 3, 6)
        assert yaml.safe_load((server.root / "jobs" / job_id / "job.yaml").read_text())["model"]["name_or_path"] == str(
            server.root.resolve() / "files/tiny-model"
        )

        # The page follows the new job to its end; its loss spans less than a decade: linear, until ticked.
        page.wait_for(f"document.getElementById('job-id').textContent === '{job_id}'", "the new job selected")
        page.wait_for("document.getElementById('job-state').textContent === 'succeeded'", "the job to succeed")
        page.wait_for("document.getElementById('loss-path').dataset.points === '6'", "its six steps")
        page.wait_for(
            "document.querySelector('#summary dd[data-key=\"adapter\"]').textContent.endsWith('KiB')", "the summary"
        )
        assert page.run("document.getElementById('curve').dataset.scale") == "linear"
        assert page.run("[defaultScale([8.6, 1.2, 0.003]), defaultScale([5.75, 5.4]), defaultScale([9])]") == [
            "log",
            "linear",
            "linear",
        ]
        page.run("document.getElementById('log-scale').click()")
        assert page.run("document.getElementById('curve').dataset.scale") == "log"
        ticks = page.run("[...document.querySelectorAll('#curve text.y-tick')].map((t) => Number(t.textContent))")
        rows = client.get(f"/v1/jobs/{job_id}/metrics").json()["rows"]
        drawn = [row[key] for row in rows for key in ("loss", "eval_loss") if row.get(key) is not None]
        assert len(ticks) == 5 and min(drawn) - 0.01 <= min(ticks) < max(ticks) <= max(drawn) + 0.01, ticks
        shots.append(page.screenshot(tmp_path / "page-2-new-job-log-axis.png"))

        # Compare: tick both jobs; one chart, a train-loss line for each.
        for compared in (demo_job, job_id):
            page.run(f"document.querySelector('tr[data-job=\"{compared}\"] input.compare').click()")
        page.wait_for("!document.getElementById('compare').hidden", "the comparison")
        points = "document.querySelector('#compare-chart path.loss[data-job=\"{}\"]')?.dataset.points"
        page.wait_for(points.format(job_id), "the new job's line")
        assert (page.run(points.format(demo_job)), page.run(points.format(job_id))) == ("4", "6")
        assert page.run("document.getElementById('compare-legend').textContent").count(": loss ") == 2
        page.run("document.getElementById('compare').scrollIntoView()")
        shots.append(page.screenshot(tmp_path / "page-3-compare.png"))
        assert page.errors == [] and server.token not in page.run("document.documentElement.outerHTML")
    for shot in shots:
        print(f"screenshot: {shot}")
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    wait_for_state(client, job_id, ("succeeded",), server)


# --------------------------------------------------------------------------- a dpo job


@pytest.fixture(scope="module")
def dpo_job(server, client):
    """A 4-step DPO job on the tiny model (pairs in files/pairs/, eval every 2 steps), finished."""
    from tests.tiny_pairs import write_pairs

    (server.root / "files" / "pairs").mkdir()
    write_pairs(server.root / "files/pairs/train.jsonl", 16, seed=1)
    write_pairs(server.root / "files/pairs/eval.jsonl", 4, seed=2)
    config = tiny_job(4, objective="dpo", dpo_beta=0.5, learning_rate=1e-2, eval_every=2)
    config["lora"]["dropout"] = 0.0
    config["data"].update(train="files/pairs/train.jsonl", eval="files/pairs/eval.jsonl")
    response = client.post("/v1/jobs", json={"config": config, "name": "dpo"})  # an idle slot may start it at once
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    assert wait_for_state(client, job_id, ("succeeded", "failed"), server)["state"] == "succeeded"
    return job_id


def written_rows(server, job_id) -> list[dict]:
    metrics = server.root / "jobs" / job_id / "output" / "metrics.jsonl"
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def test_a_dpo_jobs_summary_and_record_carry_its_preference_metrics(server, client, dpo_job):
    rows = written_rows(server, dpo_job)
    assert client.get(f"/v1/jobs/{dpo_job}/metrics").json()["rows"] == rows
    before, last = rows[0], rows[-1]
    assert before["step"] == 0 and last["step"] == 4 and "eval_rewards/accuracy" in last
    summary = client.get(f"/v1/jobs/{dpo_job}/summary").json()
    assert summary["objective"] == "dpo" and summary["finished"]
    assert set(summary["preference"]) == {"rewards/accuracy", "rewards/margin", "logps/accuracy"}
    for name, numbers in summary["preference"].items():
        assert numbers == {"train": last[name], "eval_before": before[f"eval_{name}"], "eval": last[f"eval_{name}"]}
    assert summary["preference"]["rewards/margin"]["eval_before"] == 0.0  # the adapter starts as the reference
    record = client.get(f"/v1/jobs/{dpo_job}").json()
    assert record["latest"]["rewards/accuracy"] == last["rewards/accuracy"]


def test_a_dpo_jobs_page_shows_its_rewards_from_its_metrics(server, client, dpo_job, demo_job, tmp_path):
    rows = written_rows(server, dpo_job)
    before, last = rows[0], rows[-1]

    def percent(value: float) -> str:
        return f"{100 * value:.1f}%"

    with Browser(tmp_path / "browser") as page:
        page.open(f"{server.url}/#token={server.token}&job={dpo_job}")
        page.wait_for("document.querySelectorAll('#summary dd').length === 16", "the dpo job's summary")
        shown = "document.querySelector('#summary dd[data-key=\"{}\"]').textContent"
        assert page.run(shown.format("objective")) == "dpo"
        for name, label in (("rewards/accuracy", "reward accuracy"), ("logps/accuracy", "preference accuracy")):
            assert (
                page.run(f"document.querySelector('#summary dd[data-key=\"{name}\"]').previousSibling.textContent")
                == label
            )
            assert page.run(shown.format(name)) == (
                f"train {percent(last[name])}; eval {percent(before['eval_' + name])} before, "
                f"{percent(last['eval_' + name])} after"
            )
        margin = last["rewards/margin"]
        assert page.run(shown.format("rewards/margin")).startswith(f"train {margin:.4f}; eval 0.0000 before, ")
        page.wait_for("document.getElementById('job-state').textContent === 'succeeded'", "the job's state")
        assert f"reward accuracy {percent(last['rewards/accuracy'])}, margin {margin:.4f}" in page.run(
            "document.getElementById('job-progress').textContent"
        )
        assert not page.run("document.getElementById('preference').hidden")
        page.wait_for("document.getElementById('reward-path').dataset.points === '4'", "the reward curve")
        assert page.run("document.getElementById('eval-reward-path').dataset.points") == "3"  # steps 0, 2, 4
        page.run("document.getElementById('preference').scrollIntoView()")
        shot = page.screenshot(tmp_path / "page-dpo.png")

        # An sft job's page has no reward panel and its 12 summary lines.
        page.run(f"document.querySelector('tr[data-job=\"{demo_job}\"]').click()")
        page.wait_for(f"document.getElementById('job-id').textContent === '{demo_job}'", "the demo job selected")
        page.wait_for("document.querySelectorAll('#summary dd').length === 12", "the sft job's summary")
        assert page.run("document.getElementById('preference').hidden")
        assert page.errors == []
    print(f"screenshot of a dpo job's page: {shot}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- cancel, queue, load


def test_cancel_keeps_the_checkpoint_frees_the_slot_and_the_next_job_starts(server, client, demo_job, tmp_path):
    wait_for_state(client, demo_job, ("succeeded",), server)
    long = submit(client, tiny_job(500))
    queued = submit(client, tiny_job(3))
    nxt = submit(client, tiny_job(2))
    wait_until(lambda: client.get(f"/v1/jobs/{long}").json()["step"] >= 2, "two steps of the long job", server.process)
    assert [client.get(f"/v1/jobs/{job}").json()["state"] for job in (long, queued, nxt)] == [
        "running",
        "queued",
        "queued",
    ]
    live = browse(server, long, tmp_path)  # the page follows a running job
    assert 'id="job-state" class="state running"' in live.dom and live.points("loss-path") >= 2

    assert client.post(f"/v1/jobs/{queued}/cancel").json() == {"id": queued, "state": "cancelled"}
    assert client.get(f"/v1/jobs/{queued}").json()["state"] == "cancelled"
    assert client.post(f"/v1/jobs/{long}/cancel").json()["state"] == "cancelling"

    cancelled = wait_for_state(client, long, ("cancelled", "failed", "succeeded"), server)
    assert (cancelled["state"], cancelled["exit_code"]) == ("cancelled", EXIT_INTERRUPTED)
    checkpoints = server.root / "jobs" / long / "output" / "checkpoints"
    (checkpoint,) = [path for path in checkpoints.iterdir() if not path.name.startswith(".")]
    assert checkpoint.name == f"step-{cancelled['step']:08d}" and (checkpoint / "COMPLETE").exists()

    finished = wait_for_state(client, nxt, ("succeeded", "failed"), server)
    assert finished["state"] == "succeeded" and finished["attempts"] == 1
    assert finished["started"] >= cancelled["finished"] - 1
    assert client.get(f"/v1/jobs/{queued}").json()["attempts"] == 0  # never ran
    assert client.get("/healthz").json()["busy"] == 0


def test_200_concurrent_requests_while_a_job_trains_are_all_answered_and_the_job_is_unaffected(
    server, client, reference_adapter
):
    job_id = submit(client, tiny_job(8))
    wait_until(lambda: client.get(f"/v1/jobs/{job_id}").json()["step"] >= 1, "the job to train", server.process)

    def ask(index: int) -> tuple[int, object]:
        with httpx.Client(base_url=server.url, headers=server.headers(), timeout=300) as own:
            response = own.get(f"/v1/jobs/{job_id}" if index % 2 else "/v1/jobs")
        return response.status_code, response.json()

    with ThreadPoolExecutor(max_workers=50) as pool:
        answers = list(pool.map(ask, range(200)))
    assert [status for status, _ in answers] == [200] * 200
    assert all(body["id"] == job_id for status, body in answers[1::2])
    assert all(job_id in [job["id"] for job in body["jobs"]] for status, body in answers[0::2])
    states = {body["state"] for status, body in answers[1::2]}
    assert "running" in states

    finished = wait_for_state(client, job_id, ("succeeded", "failed"), server)
    assert finished["state"] == "succeeded", finished
    assert sha256(server.root / "jobs" / job_id / "output" / "adapter_model.safetensors") == reference_adapter


# --------------------------------------------------------------------------- security


def test_requests_without_the_right_token_get_401(server):
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": f"Bearer {TOKEN}x"},
    ):
        for method, path in [
            ("GET", "/healthz"),
            ("GET", "/v1/jobs"),
            ("POST", "/v1/jobs"),
            ("PUT", "/v1/files/x.jsonl"),
            ("GET", "/v1/adapters"),
            ("GET", "/v1/jobs/20261123-000000-abcdef/summary"),
            ("GET", "/v1/jobs/20261123-000000-abcdef/metrics"),
            ("GET", "/v1/jobs/20261123-000000-abcdef/config"),
            ("GET", "/v1/files/tiny/train.jsonl"),
        ]:
            response = httpx.request(method, server.url + path, headers=headers, content=b"{}")
            assert response.status_code == 401, (method, path, headers)
            assert response.headers["www-authenticate"].startswith("Bearer")
    assert not (server.root / "files" / "x.jsonl").exists()
    with server.client() as client:
        assert client.get("/v1/jobs/20261123-000000-abcdef").status_code == 404
        assert client.get("/v1/jobs/..%2F..%2Fservice_token").status_code == 404
    # The page shell and the schema hold no data: public.
    assert httpx.get(server.url + "/").status_code == 200
    schema = httpx.get(server.url + "/openapi.json").json()
    assert {
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/events",
        "/v1/jobs/{job_id}/cancel",
        "/v1/jobs/{job_id}/adapter",
        "/v1/adapters",
        "/v1/files/{path}",
        "/v1/jobs/{job_id}/summary",
        "/v1/jobs/{job_id}/metrics",
        "/v1/jobs/{job_id}/config",
        "/healthz",
    } <= set(schema["paths"])


def test_paths_outside_the_root_are_refused(server, client, tmp_path):
    outside = tmp_path / "secret.jsonl"
    shutil.copy(server.root / "files/tiny/train.jsonl", outside)
    os.symlink(outside, server.root / "files" / "escape.jsonl")
    os.symlink(tmp_path, server.root / "files" / "escape-folder")
    jobs_before = sorted((server.root / "jobs").iterdir())
    for path, reason in [
        ("../secret.jsonl", "'..' is refused"),
        ("files/../../secret.jsonl", "'..' is refused"),
        (str(outside), "absolute paths are refused"),
        ("~/secret.jsonl", "absolute paths are refused"),
        ("files/escape.jsonl", "resolves outside the service root"),
        ("files/escape-folder/secret.jsonl", "resolves outside the service root"),
    ]:
        config = tiny_job(2)
        config["data"]["train"] = path
        response = client.post("/v1/jobs", json={"config": config})
        assert response.status_code == 400, path
        assert response.json()["detail"].startswith(f"data.train: {path}: {reason}")
    config = tiny_job(2)
    config["model"]["name_or_path"] = "../tiny-model"
    assert (
        client.post("/v1/jobs", json={"config": config})
        .json()["detail"]
        .startswith("model.name_or_path: ../tiny-model: '..' is refused")
    )
    assert sorted((server.root / "jobs").iterdir()) == jobs_before  # nothing left behind

    for path in ["..%2F..%2Fescape.jsonl", "%2Fetc%2Fescape.jsonl", "escape-folder/new.jsonl"]:
        response = client.put(f"/v1/files/{path}", content=b"{}\n")
        assert response.status_code in (400, 404), path
    assert not (tmp_path / "new.jsonl").exists() and not (server.root.parent / "escape.jsonl").exists()
    for path in ["escape.jsonl", "escape-folder/secret.jsonl"]:  # reading a file follows the same rules
        response = client.get(f"/v1/files/{path}")
        assert response.status_code == 400 and "resolves outside the service root" in response.json()["detail"]
    assert client.get("/v1/files/..%2Fservice_token").status_code == 400


def test_an_invalid_config_gets_400_with_the_clis_one_line_error(server, client, tmp_path):
    config = tiny_job(2)
    config["train"]["max_stepz"] = 3
    response = client.post("/v1/jobs", json={"config": config})
    assert response.status_code == 400
    detail = response.json()["detail"]
    # The CLI's line for the same file, with the job file's place in the root as the source.
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError) as cli:
        load_config(tmp_path / "job.yaml")
    assert (
        detail.split(": ", 1)[1]
        == str(cli.value).split(": ", 1)[1]
        == "train.max_stepz: unknown key (did you mean 'train.max_steps'?)"
    )
    assert detail.startswith("jobs/") and detail.split(": ")[0].endswith("/job.yaml")

    config = tiny_job(2)
    config["data"]["train"] = "files/tiny/missing.jsonl"
    detail = client.post("/v1/jobs", json={"config": config}).json()["detail"]
    assert "files/tiny/missing.jsonl" in detail and str(server.root) not in detail

    config = tiny_job(2)
    config["model"]["trust_remote_code"] = True
    response = client.post("/v1/jobs", json={"config": config})
    assert response.status_code == 400 and response.json()["detail"].startswith("model.trust_remote_code: refused")
    assert client.post("/v1/jobs", json={"config": "[1, 2"}).json()["detail"].startswith("config: not valid YAML")
    assert client.post("/v1/jobs", json={"cfg": {}}).status_code == 400


def test_oversized_uploads_are_refused_while_streaming(server, client):
    too_big = b"x" * (MAX_UPLOAD + 1)
    response = client.put("/v1/files/big.jsonl", content=too_big)
    assert response.status_code == 413 and "limit" in response.json()["detail"]

    def chunks():  # no Content-Length: the server counts as the body arrives
        for _ in range(MAX_UPLOAD // 2**16 + 8):
            yield b"y" * 2**16

    response = client.put("/v1/files/big-chunked.jsonl", content=chunks())
    assert response.status_code == 413
    leftovers = [
        path.name for path in (server.root / "files").iterdir() if "big" in path.name or path.name.startswith(".upload")
    ]
    assert leftovers == []
    assert client.put("/v1/files/tiny/train.jsonl", content=b"{}\n").status_code == 409  # never replaced silently


# --------------------------------------------------------------------------- restart


def test_sigkill_or_sigterm_of_the_service_mid_job_then_restart_resumes_to_the_same_adapter(
    tmp_path, tiny_model_dir, reference_adapter
):
    root = tmp_path / "root"
    root.mkdir()
    populate_root(root, tiny_model_dir)
    service = Server(root, step_delay=0.5, token=None).start()  # token=None: the token file is created
    assert (root / "service_token").stat().st_mode & 0o777 == 0o600
    try:
        with service.client() as client:
            job_id = submit(client, tiny_job(8))
            wait_until(lambda: client.get(f"/v1/jobs/{job_id}").json()["step"] >= 3, "three steps", service.process)
        service.kill()
        # The kernel sends the orphaned `qlora train` one SIGTERM: it checkpoints its step and exits.
        output = root / "jobs" / job_id / "output"
        wait_until(lambda: not in_use(output), "the orphaned job to free its output folder", seconds=120)
        assert any((path / "COMPLETE").exists() for path in (output / "checkpoints").iterdir())
        assert not (output / "summary.json").exists()

        service.start()
        with service.client() as client:
            wait_until(lambda: client.get(f"/v1/jobs/{job_id}").json()["step"] >= 5, "two more steps", service.process)
            assert client.get(f"/v1/jobs/{job_id}").json()["attempts"] == 2
        # A graceful stop (SIGTERM) asks the job to checkpoint, waits for it, and leaves it interrupted.
        service.stop()
        # uvicorn re-raises the signal after its clean shutdown
        assert service.process.returncode in (0, -signal.SIGTERM)
        with sqlite3.connect(root / "service.db") as database:
            assert database.execute("SELECT state, exit_code FROM jobs WHERE id = ?", (job_id,)).fetchone() == (
                "interrupted",
                EXIT_INTERRUPTED,
            )

        service.start()
        with service.client() as client:
            finished = wait_for_state(client, job_id, ("succeeded", "failed", "cancelled"), service)
        assert (finished["state"], finished["attempts"]) == ("succeeded", 3), finished
        log = (root / "jobs" / job_id / "log.txt").read_text()
        assert log.count("resuming from") == 2 and log.count("interrupted: stopped on request") == 2
        assert sha256(output / "adapter_model.safetensors") == reference_adapter
    finally:
        service.stop()
    assert TOKEN not in service.output() and service.token not in service.output()
