"""OUTPUT/config.yaml is the config that trained: written once the micro-batch is final, and
running it again reproduces the run step for step."""

import json

import yaml

import qlora.job.run as job
from qlora.config import load_config
from qlora.job.run import run_job
from qlora.plan.micro_batch import step_down_until_fits
from tests.tiny import write_job


def losses(output_dir):
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [(row["step"], row.get("loss"), row.get("eval_loss")) for row in rows]


def test_the_saved_config_is_the_micro_batch_that_trained_and_reproduces_the_run(tiny_model_dir, tmp_path, monkeypatch):
    auto = {"micro_batch_size": "auto", "effective_batch_size": 4, "memory_budget": "8GiB", "max_steps": 3}
    path = write_job(tmp_path, tiny_model_dir, train=auto)

    # On CUDA a dry run steps an optimistic plan down (qlora.plan.micro_batch.confirm_micro_batch);
    # a CPU has no peak to read, so step down here through the same rule, with peaks over the
    # budget above one sequence.
    def dry_run_steps_down(config, budget, measure_peak, echo):
        step_down_until_fits(config, budget, 0, lambda micro_batch: budget if micro_batch > 1 else 0, echo)

    monkeypatch.setattr(job, "confirm_micro_batch", dry_run_steps_down)
    first = run_job(load_config(path), echo=lambda line: None).output_dir
    saved = yaml.safe_load((first / "config.yaml").read_text())["train"]
    assert (saved["micro_batch_size"], saved["grad_accum_steps"]) == (1, 4)
    assert saved["gradient_checkpointing"] in (True, False, "selective")  # auto's pick, not "auto"

    # The saved config alone, on this machine, with no step-down: the same run.
    monkeypatch.undo()
    again = run_job(load_config(first / "config.yaml", [f"output.dir={tmp_path / 'again'}"]), echo=lambda line: None)
    assert losses(again.output_dir) == losses(first)
    assert yaml.safe_load((again.output_dir / "config.yaml").read_text())["train"] == saved
