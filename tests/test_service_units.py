"""The service's pieces without a server: paths, token, GPU slots, queue order, compose file."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qlora.cli.serve import claim_root, gpu_slots, slots_from_listing
from qlora.errors import ConfigError, OutputError
from qlora.service.process import child_environment
from qlora.service.security import PathRejected, inside_root, load_or_create_token, token_matches
from qlora.service.store import Store

ROOT = Path(__file__).resolve().parents[1]


def test_paths_resolve_inside_the_root_only(tmp_path):
    root = tmp_path / "root"
    (root / "data").mkdir(parents=True)
    (root / "data" / "rows.jsonl").write_text("{}\n")
    (tmp_path / "outside.jsonl").write_text("{}\n")
    os.symlink(root / "data" / "rows.jsonl", root / "data" / "alias.jsonl")
    os.symlink(tmp_path / "outside.jsonl", root / "data" / "escape.jsonl")
    os.symlink(root, tmp_path / "root-link")

    assert inside_root(root, "data/alias.jsonl", "k") == (root / "data" / "rows.jsonl").resolve()
    assert inside_root(tmp_path / "root-link", "data/rows.jsonl", "k") == (root / "data" / "rows.jsonl").resolve()
    for path, reason in [
        ("../outside.jsonl", "'..'"),
        ("data/../data/rows.jsonl", "'..'"),
        ("/etc/passwd", "absolute"),
        ("~/x.jsonl", "absolute"),
        ("data/escape.jsonl", "outside the service root"),
        ("", "expected a path"),
    ]:
        with pytest.raises(PathRejected, match=reason) as error:
            inside_root(root, path, "data.train")
        assert str(error.value).startswith("data.train: ")


def test_the_token_file_is_created_0600_once_and_compared_in_full(tmp_path, monkeypatch):
    monkeypatch.delenv("QLORA_SERVICE_TOKEN", raising=False)
    lines = []
    token = load_or_create_token(tmp_path, echo=lines.append)
    assert (tmp_path / "service_token").stat().st_mode & 0o777 == 0o600
    assert len(token) >= 40 and not any(token in line for line in lines)
    assert load_or_create_token(tmp_path, echo=lines.append) == token
    os.chmod(tmp_path / "service_token", 0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        load_or_create_token(tmp_path, echo=lines.append)
    monkeypatch.setenv("QLORA_SERVICE_TOKEN", "from-env")
    assert load_or_create_token(tmp_path, echo=lines.append) == "from-env"

    assert token_matches(f"Bearer {token}", token) and token_matches(f"bearer {token}", token)
    for header in (None, "", token, f"Bearer {token[:-1]}", f"Bearer {token}x", f"Basic {token}", "Bearer "):
        assert not token_matches(header, token)


def test_gpu_slots_follow_the_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert gpu_slots(None) == ["2", "3"] and gpu_slots(1) == ["2"]
    with pytest.raises(ConfigError, match="only 2 GPU"):
        gpu_slots(3)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,-1,0")  # CUDA stops at the first invalid entry
    assert gpu_slots(None) == ["1"]
    for hidden in ("", "-1"):  # the operator hid every GPU: N slots on the CPU, handing out no GPU
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert gpu_slots(None) == ["cpu0"] and gpu_slots(2) == ["cpu0", "cpu1"]
        child = child_environment(",".join(gpu_slots(2)))
        assert child["CUDA_VISIBLE_DEVICES"] == hidden and "CUDA_DEVICE_ORDER" not in child
    with pytest.raises(ConfigError, match="--gpus"):
        gpu_slots(0)
    # A GPU slot: that GPU, numbered as nvidia-smi numbers it.
    assert {key: child_environment("2,3")[key] for key in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER")} == {
        "CUDA_VISIBLE_DEVICES": "2,3",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
    }


def test_slots_from_nvidia_smi_use_its_order_and_the_mig_instances_of_a_split_gpu():
    listing = """GPU 0: NVIDIA A100-SXM4-80GB (UUID: GPU-aaaa)
  MIG 3g.40gb     Device  0: (UUID: MIG-1111)
  MIG 3g.40gb     Device  1: (UUID: MIG-2222)
GPU 1: NVIDIA A100-SXM4-80GB (UUID: GPU-bbbb)
GPU 2: NVIDIA H100 80GB HBM3 (UUID: GPU-cccc)
  MIG 7g.80gb     Device  0: (UUID: MIG-3333)
"""
    assert slots_from_listing(listing) == ["MIG-1111", "MIG-2222", "1", "MIG-3333"]
    assert slots_from_listing("") == []


def test_the_queue_runs_higher_priority_first_then_oldest_first(tmp_path):
    store = Store(tmp_path / "service.db")
    for job_id, priority in [("a", 0), ("b", 0), ("c", 5), ("d", 0)]:
        store.add(job_id, None, priority, None)
    assert store.transition("b", ("running",), "succeeded") is False  # it is not running: nothing written
    assert store.transition("d", ("queued",), "cancelled")
    assert store.transition("a", ("queued",), "interrupted")
    assert [job.id for job in store.waiting()] == ["c", "a", "b"]
    assert store.get("b").state == "queued" and store.get("d").state == "cancelled"
    store.close()
    assert [job.id for job in Store(tmp_path / "service.db").waiting()] == ["c", "a", "b"]  # persisted


def test_qlora_train_imports_neither_fastapi_nor_torch_for_the_cli():
    probe = "import sys, qlora.cli.main; print(sorted({'fastapi', 'uvicorn', 'torch'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_compose_file_runs_the_service_on_a_gpu_with_a_data_volume():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    service = compose["services"]["serve"]
    assert service["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}
    assert service["command"][:3] == ["serve", "--root", "/data"] and "0.0.0.0" in service["command"]
    assert service["ports"] == ["127.0.0.1:8000:8000"]
    assert "QLORA_SERVICE_TOKEN" in service["environment"]
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    volume, mount = service["volumes"][0].split(":")
    assert mount == "/data" and volume in compose["volumes"]
    grace = int(service["stop_grace_period"].removesuffix("s"))
    assert grace > 300  # longer than the service's default --stop-grace: jobs checkpoint before the kill


def test_one_service_per_root(tmp_path):
    held = claim_root(tmp_path)
    with pytest.raises(OutputError, match="is in use by another qlora serve"):
        claim_root(tmp_path)  # an flock on a second open file conflicts, even in one process
    held.close()
    claim_root(tmp_path).close()


def test_notes_are_kept_in_the_record_and_an_older_database_gains_the_column(tmp_path):
    import sqlite3

    with sqlite3.connect(tmp_path / "service.db") as database:  # a service.db from before the notes column
        database.execute(
            "CREATE TABLE jobs (id TEXT PRIMARY KEY, name TEXT, state TEXT NOT NULL,"
            " priority INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL, started REAL, finished REAL,"
            " total_steps INTEGER, attempts INTEGER NOT NULL DEFAULT 0, exit_code INTEGER, error TEXT,"
            " pid INTEGER, slot TEXT, cancel_requested INTEGER NOT NULL DEFAULT 0)"
        )
        database.execute("INSERT INTO jobs (id, state, created) VALUES ('old', 'succeeded', 0)")
    store = Store(tmp_path / "service.db")
    assert store.get("old").record()["notes"] == [] and store.get("old").gpus == 1
    store.add("new", None, 0, 4, notes=("output.dir: 'out' is not used",))
    assert store.get("new").record()["notes"] == ["output.dir: 'out' is not used"]


def test_a_submitted_output_dir_gets_a_note_saying_where_the_output_goes():
    from qlora.service.submission import output_notes

    assert output_notes({"model": {}}, "J") == () and output_notes({"output": {"keep_checkpoints": 2}}, "J") == ()
    assert output_notes({"output": {"dir": "runs/mine"}}, "J") == (
        "output.dir: 'runs/mine' is not used: the output goes to jobs/J/output (download the adapter with GET "
        "/v1/jobs/J/adapter)",
    )


def test_the_summary_of_a_running_job_comes_from_its_metrics_and_of_a_finished_one_from_summary_json(tmp_path):
    import json

    from qlora.service.summary import job_summary, read_metrics

    root = tmp_path / "root"
    folder = root / "jobs" / "J"
    (folder / "output").mkdir(parents=True)
    (folder / "job.yaml").write_text(
        yaml.safe_dump(
            {
                "model": {"name_or_path": str(root / "files/base")},
                "lora": {"r": 4, "alpha": 8},
                "data": {"train": str(root / "files/rows.jsonl")},
                "train": {"max_steps": 3, "learning_rate": 5e-4},
                "output": {"dir": str(folder / "output")},
            }
        )
    )
    rows = [
        {"step": 0, "eval_loss": 3.0},
        {"step": 1, "loss": 2.9, "tokens_per_s": 10.0, "mfu": 0.01, "elapsed_s": 1.0},
        {"step": 2, "loss": 2.5, "tokens_per_s": 12.0, "mfu": 0.02, "elapsed_s": 2.0},
        {"step": 2, "loss": 2.4, "tokens_per_s": 13.0, "mfu": 0.03, "elapsed_s": 2.1},  # a resumed run's rewrite
    ]
    metrics = folder / "output" / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(row) + "\n" for row in rows) + '{"step": 3, "lo')  # a line being written
    assert [row["loss"] for row in read_metrics(metrics) if "loss" in row] == [2.9, 2.4]

    store = Store(tmp_path / "service.db")
    store.add("J", "mine", 0, 3)
    store.transition("J", ("queued",), "running", started=1.0)
    running = job_summary(store.get("J"), folder, root)
    assert (running["base"], running["lora"], running["learning_rate"]) == (
        "files/base",
        {"r": 4, "alpha": 8.0, "dropout": 0.05},
        5e-4,
    )
    assert running["quantization"]["bits"] == 4 and running["quantization"]["quant_type"] == "nf4"
    assert (running["step"], running["supervised_tokens_per_s"], running["mfu"], running["final_loss"]) == (
        2,
        13.0,
        0.03,
        2.4,
    )
    assert (running["initial_eval_loss"], running["final_eval_loss"], running["peak_memory_bytes"]) == (3.0, 3.0, None)
    assert running["finished"] is False and running["duration_s"] > 0

    finished = {
        "seconds": 3.0,
        "tokens_per_s": 11.0,
        "mfu": 0.02,
        "peak_memory_bytes": 2**20,
        "adapter_bytes": 99,
        "peak_memory_kind": "process_rss",
        "final_loss": 2.3,
        "eval_loss": 2.2,
        "eval_loss_before": 3.0,
    }
    (folder / "output" / "summary.json").write_text(json.dumps(finished))
    store.transition("J", ("running",), "succeeded", finished=11.0)
    done = job_summary(store.get("J"), folder, root)
    assert (done["duration_s"], done["train_seconds"], done["supervised_tokens_per_s"], done["adapter_bytes"]) == (
        10.0,
        3.0,
        11.0,
        99,
    )
    assert (done["final_loss"], done["initial_eval_loss"], done["final_eval_loss"], done["finished"]) == (
        2.3,
        3.0,
        2.2,
        True,
    )


def test_a_running_dpo_jobs_summary_reads_its_preference_metrics_from_its_rows(tmp_path):
    import json

    from qlora.service.summary import job_summary

    root = tmp_path / "root"
    folder = root / "jobs" / "J"
    (folder / "output").mkdir(parents=True)
    job = {
        "model": {"name_or_path": str(root / "files/base")},
        "data": {"train": str(root / "files/pairs.jsonl")},
        "train": {"objective": "orpo", "max_steps": 3},
        "output": {"dir": str(folder / "output")},
    }
    (folder / "job.yaml").write_text(yaml.safe_dump(job))
    rows = [
        {"step": 0, "eval_loss": 0.7, "eval_rewards/accuracy": 0.5, "eval_log_odds_ratio": -0.7},
        {"step": 1, "loss": 0.69, "rewards/accuracy": 0.25, "rewards/margin": 0.01, "log_odds_ratio": -0.69},
        {"step": 2, "loss": 0.6, "rewards/accuracy": 0.75, "rewards/margin": 0.1, "eval_loss": 0.65},
    ]
    rows[2].update({"eval_rewards/accuracy": 1.0, "eval_log_odds_ratio": -0.5})
    (folder / "output" / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    store = Store(tmp_path / "service.db")
    store.add("J", "mine", 0, 3)
    store.transition("J", ("queued",), "running", started=1.0)
    summary = job_summary(store.get("J"), folder, root)
    assert summary["objective"] == "orpo" and not summary["finished"]
    assert summary["preference"] == {
        "rewards/accuracy": {"train": 0.75, "eval_before": 0.5, "eval": 1.0},
        "rewards/margin": {"train": 0.1, "eval_before": None, "eval": None},
        "log_odds_ratio": {"train": -0.69, "eval_before": -0.7, "eval": -0.5},  # the last step that has one
    }
    job["train"]["objective"] = "sft"
    (folder / "job.yaml").write_text(yaml.safe_dump(job))
    assert job_summary(store.get("J"), folder, root)["preference"] is None
