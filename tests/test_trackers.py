"""Experiment trackers (train.report_to) with the real libraries, offline: TensorBoard's events read
back with its EventAccumulator, MLflow's file store queried with MlflowClient, W&B's offline run
read with wandb's own reader (`wandb leet inspect --json`). A killed run resumed continues the same
tracker runs with every step once; a tracker failing mid-run never fails the training."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qlora.cli.main import main
from qlora.config import JobConfig, load_config
from qlora.errors import EXIT_CONFIG, ConfigError
from qlora.job.run import run_job
from qlora.job.tracking import job_trackers
from tests.tiny import write_job
from tests.tiny_training import Killed, kill_before_step

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")
pytest.importorskip("wandb")


@pytest.fixture
def offline_trackers(tmp_path, monkeypatch):
    """W&B offline into tmp, MLflow's default local store; restored afterwards."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("WANDB_PROJECT", "qlora-tests")
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "wandb-dir").mkdir()
    return tmp_path / "wandb-dir"


def rows_of(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def losses(rows: list[dict]) -> dict:
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def test_report_to_reads_none_a_name_or_a_list_and_names_a_bad_one():
    def report_to(value):
        return JobConfig.model_validate(
            {"model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}, "output": {"dir": "o"}, "train": value}
        ).train.report_to

    assert report_to({}) == [] and report_to({"report_to": "none"}) == [] and report_to({"report_to": []}) == []
    assert report_to({"report_to": "wandb"}) == ["wandb"]
    assert report_to({"report_to": ["mlflow", "tensorboard", "mlflow"]}) == ["mlflow", "tensorboard"]
    with pytest.raises(Exception, match="train.report_to: expected any of tensorboard, mlflow, wandb"):
        report_to({"report_to": ["comet"]})


def test_a_tracker_not_installed_is_a_one_line_error_before_anything_loads(
    tiny_model_dir, tmp_path, capsys, monkeypatch
):
    job = write_job(tmp_path, tiny_model_dir, train={"max_steps": 1, "report_to": ["tensorboard", "mlflow"]})
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what `import mlflow` meets where it is not installed
    assert main(["train", str(job)]) == EXIT_CONFIG
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: train.report_to: mlflow is not installed; pip install 'qlora[mlflow]' (or remove it from the list)"
    ]
    assert main(["validate", str(job)]) == EXIT_CONFIG
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError):
        run_job(load_config(job), echo=lambda line: None)


def test_only_rank_0_opens_trackers(tmp_path):
    config = JobConfig.model_validate(
        {
            "model": {"name_or_path": "m"},
            "data": {"train": "t.jsonl"},
            "output": {"dir": str(tmp_path / "out")},
            "train": {"report_to": ["tensorboard"]},
        }
    )
    (tmp_path / "out").mkdir()
    with job_trackers(config, None, 0, print, main=False) as trackers:
        assert not trackers
    assert list((tmp_path / "out").iterdir()) == []
    with job_trackers(config, None, 0, print, main=True) as trackers:
        assert [tracker.name for tracker in trackers.trackers] == ["tensorboard"]
    assert (tmp_path / "out" / "tensorboard").is_dir()


def tensorboard_scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder))
    accumulator.Reload()
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def wandb_records(wandb_dir: Path, run_id: str) -> list[dict]:
    """Every record of every offline segment of the run, oldest first, through wandb's own reader."""
    records = []
    for run_file in sorted(wandb_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")):
        read = subprocess.run(
            [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_file)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        records += [json.loads(line) for line in read.stdout.splitlines() if line.startswith("{")]
    return records


def test_a_killed_run_resumed_logs_every_step_once_to_each_tracker(tiny_model_dir, tmp_path, offline_trackers):
    train = {"max_steps": 4, "save_every": 2, "eval_every": 2, "report_to": ["tensorboard", "mlflow", "wandb"]}
    job = write_job(tmp_path, tiny_model_dir, train=train)
    output = tmp_path / "out"
    with pytest.raises(Killed):  # steps 1-3 logged, the checkpoint at 2
        run_job(load_config(job), echo=lambda line: None, stop_requested=kill_before_step(4))
    first_ids = json.loads((output / "trackers.json").read_text())
    killed_loss_3 = losses(rows_of(output))[3]
    lines = []
    result = run_job(load_config(job), echo=lines.append)
    assert not [line for line in lines if line.startswith("warning")], lines
    assert json.loads((output / "trackers.json").read_text()) == first_ids  # the same tracker runs
    rows = rows_of(output)
    expected = losses(rows)
    assert sorted(expected) == [1, 2, 3, 4] and expected[3] == killed_loss_3  # resumed bitwise on CPU
    adapter = str(result.adapter_path)

    # TensorBoard: the killed run's step 3 purged, logged again by the resumed run; float32 events.
    scalars = tensorboard_scalars(output / "tensorboard", "loss")
    assert [step for step, _ in scalars] == [1, 2, 3, 4]
    assert all(value == np.float32(expected[step]) for step, value in scalars)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output / "tensorboard"))
    events.Reload()
    assert events.Tensors("adapter/text_summary")[-1].tensor_proto.string_val == [adapter.encode()]
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]  # the HParams tab's
    hparams = HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["lora.r"].number_value == 8 and hparams["train.report_to"].string_value.startswith("[")
    eval_steps = [row["step"] for row in rows if "eval_loss" in row]
    assert [step for step, _ in tensorboard_scalars(output / "tensorboard", "eval_loss")] == eval_steps == [0, 2, 4]

    # MLflow: one run (the stored id), every step once, exact values, the config and the adapter.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(output / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("qlora")
    runs = client.search_runs([experiment.experiment_id])
    assert [run.info.run_id for run in runs] == [first_ids["mlflow"]["run_id"]]
    history = client.get_metric_history(runs[0].info.run_id, "loss")
    assert sorted((metric.step, metric.value) for metric in history) == sorted(expected.items())
    assert {metric.step for metric in client.get_metric_history(runs[0].info.run_id, "lr")} == {1, 2, 3, 4}
    assert runs[0].data.params["train.max_steps"] == "4" and runs[0].data.params["lora.r"] == "8"
    assert runs[0].data.tags["adapter"] == adapter and runs[0].info.status == "FINISHED"

    # W&B: two offline segments of one run id (killed, resumed): every step once, the same losses.
    run_id = first_ids["wandb"]["run_id"]
    records = wandb_records(offline_trackers, run_id)
    assert {record["run"]["run_id"] for record in records if record["type"] == "run"} == {run_id}
    history = [record["history"] for record in records if record["type"] == "history"]
    logged = [(entry["step"]["num"], entry["item"].get("loss")) for entry in history if "loss" in entry["item"]]
    assert sorted(logged) == sorted(expected.items())
    config, summary = {}, {}
    for record in records:
        if record["type"] == "config":
            config.update(record["config"].get("update", {}))
        if record["type"] == "summary":
            summary.update(record["summary"].get("update", {}))
    assert config["train.max_steps"] == 4 and config["lora.r"] == 8
    assert summary["adapter"] == adapter


def test_a_tracker_failing_mid_run_never_fails_the_training(tiny_model_dir, tmp_path, offline_trackers, monkeypatch):
    output = tmp_path / "out"
    stops = iter(range(1, 100))

    def store_gone_before_step_3():
        if next(stops) == 3:
            shutil.rmtree(output / "mlruns")  # the real store vanishes under the real client
        return False

    job = write_job(tmp_path, tiny_model_dir, train={"max_steps": 4, "report_to": ["mlflow", "tensorboard"]})
    lines = []
    result = run_job(load_config(job), echo=lines.append, stop_requested=store_gone_before_step_3)
    warnings = [line for line in lines if line.startswith("warning")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: mlflow failed to log"), lines
    assert [row["step"] for row in rows_of(output)] == [0, 1, 2, 3, 4]
    assert (output / "summary.json").is_file() and result.loop.steps == 4
    assert [step for step, _ in tensorboard_scalars(output / "tensorboard", "loss")] == [1, 2, 3, 4]

    # A server nobody listens on: one warning at the start, then the training as if it were not named.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    lines = []
    run_job(load_config(job, ["train.report_to=mlflow"]), echo=lines.append, overwrite=True)
    warnings = [line for line in lines if line.startswith("warning")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: mlflow failed to start"), lines
    assert [row["step"] for row in rows_of(output)] == [0, 1, 2, 3, 4] and (output / "summary.json").is_file()


def test_a_resume_keeps_the_stored_ids_of_trackers_not_started_this_time(tmp_path):
    from qlora.training.trackers import STATE_FILE, open_trackers

    stored = {"mlflow": {"run_id": "abc", "tracking_uri": "http://tracking"}, "wandb": {"run_id": "xyz"}}
    (tmp_path / STATE_FILE).write_text(json.dumps(stored))
    trackers = open_trackers(["tensorboard"], tmp_path, {}, resume_step=2, logged_through=3, warn=print)
    trackers.close()
    assert json.loads((tmp_path / STATE_FILE).read_text()) == stored


def test_a_dpo_runs_rewards_reach_every_tracker(tiny_model_dir, tmp_path, offline_trackers):
    """rewards/* and logps/* of the steps, and their eval_ twins, land in TensorBoard, MLflow and
    W&B with the values metrics.jsonl holds, each at its step."""
    from tests.tiny_pairs import write_pairs

    write_pairs(tmp_path / "train.jsonl", 16, seed=1)
    write_pairs(tmp_path / "eval.jsonl", 4, seed=2)
    train = {
        "objective": "dpo",
        "max_steps": 4,
        "eval_every": 2,
        "dpo_beta": 0.5,
        "learning_rate": 1e-2,
        "report_to": ["tensorboard", "mlflow", "wandb"],
    }
    run_job(load_config(write_job(tmp_path, tiny_model_dir, train=train)), echo=lambda line: None)
    output = tmp_path / "out"
    rows = rows_of(output)
    names = ["rewards/accuracy", "rewards/margin", "rewards/chosen", "rewards/rejected", "logps/accuracy"]
    tags = names + [f"eval_{name}" for name in names]
    expected = {tag: {row["step"]: row[tag] for row in rows if tag in row} for tag in tags}
    assert sorted(expected["rewards/margin"]) == [1, 2, 3, 4] and sorted(expected["eval_rewards/margin"]) == [0, 2, 4]
    assert any(value != 0.0 for value in expected["rewards/margin"].values())

    for tag in tags:
        scalars = tensorboard_scalars(output / "tensorboard", tag)
        assert {step: value for step, value in scalars} == {
            step: np.float32(value) for step, value in expected[tag].items()
        }, tag

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(output / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("qlora").experiment_id])
    for tag in tags:
        history = client.get_metric_history(run.info.run_id, tag)
        assert {metric.step: metric.value for metric in history} == pytest.approx(expected[tag]), tag

    run_id = json.loads((output / "trackers.json").read_text())["wandb"]["run_id"]
    items = [record["history"] for record in wandb_records(offline_trackers, run_id) if record["type"] == "history"]
    for tag in tags:
        logged = {entry["step"]["num"]: entry["item"][tag] for entry in items if tag in entry["item"]}
        assert logged == pytest.approx(expected[tag]), tag
