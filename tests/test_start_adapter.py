"""Starting from a trained adapter (model.adapter: SFT -> DPO) and DPO against a frozen earlier
adapter (model.reference_adapter); preference runs resumed bit for bit, and stopped politely."""

from __future__ import annotations

import itertools
import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from qlora.cli.main import main
from qlora.config import load_config
from qlora.errors import EXIT_CHECKPOINT, EXIT_CONFIG, EXIT_MODEL, Interrupted
from qlora.job.run import run_job
from tests.expectations import EXPECTED_FILES, one_line_error
from tests.tiny import write_job
from tests.tiny_pairs import write_pairs
from tests.tiny_training import Killed, kill_before_step

PAIR_METRICS = ("step", "loss", "grad_norm", "eval_loss", "rewards/margin", "rewards/accuracy", "eval_rewards/margin")


def quiet(line):
    pass


def rows(output):
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def stop_before(step):
    """A stop_requested hook that asks for a polite stop (SIGTERM's) before `step`."""
    calls = itertools.count(1)
    return lambda: next(calls) >= step


def dpo_job(folder, model_dir, model=None, lora=None, **train):
    folder.mkdir(exist_ok=True)
    write_pairs(folder / "train.jsonl", 16, seed=1)
    write_pairs(folder / "eval.jsonl", 4, seed=2)
    settings = {"objective": "dpo", "max_steps": 3, "micro_batch_size": 2, "grad_accum_steps": 2, "dpo_beta": 0.5}
    return write_job(
        folder,
        model_dir,
        model={"name_or_path": str(model_dir), **(model or {})},
        lora=lora or {"dropout": 0.0},
        train={**settings, "learning_rate": 5e-3, "eval_every": 1, **train},
    )


def without_lora_keys(job):
    """The job file with no lora section: the start adapter's shape is the job's."""
    content = yaml.safe_load(job.read_text())
    content.pop("lora")
    job.write_text(yaml.safe_dump(content))
    return job


def test_dpo_from_an_sft_adapter_against_itself_starts_at_zero_rewards(tiny_model_dir, trained_adapter, tmp_path):
    """The policy starts as the SFT adapter and the reference is the same adapter: every reward is
    zero before the first update and the loss is log 2; against the bare base they are not."""
    job = without_lora_keys(
        dpo_job(tmp_path / "ref", tiny_model_dir, model={"adapter": str(trained_adapter)}, lora={"dropout": 0.0})
    )
    content = yaml.safe_load(job.read_text())
    content["model"]["reference_adapter"] = str(trained_adapter)
    content["lora"] = {"dropout": 0.0}
    job.write_text(yaml.safe_dump(content))
    result = run_job(load_config(job), echo=quiet)
    logged = rows(tmp_path / "ref" / "out")
    assert logged[0]["step"] == 0 and logged[0]["eval_loss"] == pytest.approx(0.693147, abs=1e-6)
    assert logged[0]["eval_rewards/margin"] == pytest.approx(0.0, abs=1e-6)
    assert logged[1]["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)  # the first step's forward: before an update
    assert abs(logged[-1]["eval_rewards/chosen"]) > 1e-3  # the policy trained away; the reference stayed
    assert "eval_perplexity" not in logged[0] and "eval_perplexity" not in logged[-1]

    # The job took the adapter's shape (r 8, alpha 16: the SFT job's), not the lora section's defaults.
    saved = yaml.safe_load((tmp_path / "ref" / "out" / "config.yaml").read_text())
    sft_config = json.loads((trained_adapter / "adapter_config.json").read_text())
    assert (saved["lora"]["r"], saved["lora"]["alpha"]) == (8, 16.0)
    assert sorted(saved["lora"]["target_modules"]) == sorted(sft_config["target_modules"])
    # Only the trained adapter is written; it loads in plain peft, without the reference beside it.
    output = result.adapter_path.parent
    assert {path.name for path in output.iterdir()} == EXPECTED_FILES
    assert (
        load_file(str(output / "adapter_model.safetensors")).keys()
        == load_file(str(trained_adapter / "adapter_model.safetensors")).keys()
    )

    base_reference = dpo_job(tmp_path / "base", tiny_model_dir, model={"adapter": str(trained_adapter)})
    run_job(load_config(base_reference), echo=quiet)
    against_base = rows(tmp_path / "base" / "out")[0]
    assert abs(against_base["eval_rewards/margin"]) > 1e-3  # the SFT adapter already moved from the base


def test_an_sft_job_started_from_an_adapter_begins_where_it_ended(tiny_model_dir, trained_adapter, tmp_path):
    """The start adapter's weights are what trains on: its eval loss before the first step is the
    trained job's final eval loss (same eval rows)."""
    job = write_job(tmp_path, tiny_model_dir, model={"adapter": str(trained_adapter)}, train={"eval_every": 2})
    shutil.copy(trained_adapter.parent / "eval.jsonl", tmp_path / "eval.jsonl")
    run_job(load_config(job), echo=quiet)
    before = rows(tmp_path / "out")[0]
    finished = json.loads((trained_adapter / "summary.json").read_text())
    assert before["step"] == 0 and before["eval_loss"] == pytest.approx(finished["eval_loss"], rel=1e-6)


def another_base_adapter(tmp_path, trained_adapter):
    """The trained adapter with every A matrix one column wider: made for a wider base."""
    folder = tmp_path / "wide-adapter"
    shutil.copytree(trained_adapter, folder)
    (folder / "qlora_manifest.json").unlink()
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    widened = {key: torch.cat([value, value[:, :1]], 1) if "lora_A" in key else value for key, value in tensors.items()}
    save_file(widened, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


def test_bad_start_and_reference_adapters_are_one_line_errors(tiny_model_dir, trained_adapter, tmp_path, capsys):
    job = dpo_job(tmp_path, tiny_model_dir)
    output = tmp_path / "out"
    cases = [
        (["model.adapter=missing-folder"], EXIT_MODEL, "model.adapter: adapter folder not found"),
        ([f"model.reference_adapter={tmp_path}"], EXIT_MODEL, "model.reference_adapter: "),
        (
            [f"model.adapter={another_base_adapter(tmp_path, trained_adapter)}"],
            EXIT_MODEL,
            "with input size 129, but this base's has 128",
        ),
        ([f"model.adapter={trained_adapter}", "lora.r=4"], EXIT_CONFIG, "lora.r: 4, but model.adapter"),
        (
            [f"model.reference_adapter={trained_adapter}", "train.objective=orpo"],
            EXIT_CONFIG,
            "model.reference_adapter: only train.objective dpo has a reference",
        ),
    ]
    for overrides, code, message in cases:
        arguments = ["train", str(job)] + [item for override in overrides for item in ("--set", override)]
        assert main(arguments) == code, overrides
        assert message in one_line_error(capsys), overrides
        assert not output.exists()  # refused before anything was written
    # lora.dropout is a training setting: it may differ from the adapter's.
    assert main(["validate", str(job), "--set", f"model.adapter={trained_adapter}", "--set", "lora.dropout=0.1"]) == 0


def test_a_killed_dpo_run_resumed_equals_the_uninterrupted_run(tiny_model_dir, trained_adapter, tmp_path):
    """Dropout on, a reference adapter, gradient accumulation: resumed bit for bit (the reference
    log-probs are recomputed each step, nothing of them is in the checkpoint)."""
    model = {"adapter": str(trained_adapter), "reference_adapter": str(trained_adapter)}
    train = {"max_steps": 6, "save_every": 2}
    reference = dpo_job(tmp_path / "reference", tiny_model_dir, model=model, lora={"dropout": 0.1}, **train)
    interrupted = dpo_job(tmp_path / "interrupted", tiny_model_dir, model=model, lora={"dropout": 0.1}, **train)
    run_job(load_config(reference), echo=quiet)
    with pytest.raises(Killed):
        run_job(load_config(interrupted), echo=quiet, stop_requested=kill_before_step(5))
    run_job(load_config(interrupted), echo=quiet)
    wanted = [{key: row.get(key) for key in PAIR_METRICS} for row in rows(tmp_path / "reference" / "out")]
    got = [{key: row.get(key) for key in PAIR_METRICS} for row in rows(tmp_path / "interrupted" / "out")]
    assert got == wanted and len(got) == 7  # exact floats; step 0's eval and six steps
    expected = load_file(str(tmp_path / "reference" / "out" / "adapter_model.safetensors"))
    resumed = load_file(str(tmp_path / "interrupted" / "out" / "adapter_model.safetensors"))
    assert all(torch.equal(expected[key], resumed[key]) for key in expected)


def test_a_stopped_dpo_run_says_how_to_resume_and_refuses_a_changed_reference(
    tiny_model_dir, trained_adapter, tmp_path, capsys
):
    reference_copy = tmp_path / "sft-copy"
    shutil.copytree(trained_adapter, reference_copy)
    model = {"adapter": str(trained_adapter), "reference_adapter": str(reference_copy)}
    job = dpo_job(tmp_path / "job", tiny_model_dir, model=model, max_steps=4)
    with pytest.raises(Interrupted, match="checkpoint .*step-0+2; rerun the same command to resume"):
        run_job(load_config(job), echo=quiet, stop_requested=stop_before(3))
    tensors = load_file(str(reference_copy / "adapter_model.safetensors"))
    save_file({key: value * 1.5 for key, value in tensors.items()}, str(reference_copy / "adapter_model.safetensors"))
    assert main(["train", str(job)]) == EXIT_CHECKPOINT
    assert "the weights in model.adapter or model.reference_adapter" in one_line_error(capsys)
