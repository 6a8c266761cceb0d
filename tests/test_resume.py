"""A resumed run is the SAME run: tiny model, real bitsandbytes, real processes killed and signalled.

"Killed" in-process means a BaseException raised between two optimizer steps: nothing after it
runs (no graceful checkpoint, no artifacts), exactly as after kill -9. The tests with real
SIGKILL / SIGTERM / SIGINT run `python -m qlora.cli` in a subprocess (tests/cli_with_faults.py).
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora import data
from qlora.adapters import attach_lora, load_adapter_weights, save_adapter
from qlora.cli.main import main
from qlora.config import LoraSection, load_config
from qlora.errors import EXIT_ABORTED, EXIT_CHECKPOINT, EXIT_INTERRUPTED, EXIT_OUTPUT, EXIT_TRAINING, CheckpointError
from qlora.job.run import run_job
from qlora.model.base import load_tokenizer
from qlora.training.checkpoint import (
    COMPLETE_MARKER,
    complete_checkpoints,
    load_training_state,
    save_training_state,
)
from tests.tiny import write_chat_data, write_job
from tests.tiny_training import Killed, kill_before_step, settings, tiny_base, train_tiny

REPO = Path(__file__).resolve().parents[1]

ROOT = Path(__file__).resolve().parents[1]
COMPARED = ("step", "loss", "lr", "grad_norm", "supervised_tokens", "eval_loss")


def quiet(line):
    pass


def run(job, **kwargs):
    return run_job(load_config(job), echo=quiet, **kwargs)


def logged(output):
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [{key: row.get(key) for key in COMPARED} for row in rows]


def adapter(output):
    return load_file(str(output / "adapter_model.safetensors"))


def assert_same_run(reference, resumed):
    assert logged(resumed) == logged(reference)  # exact: same floats, bit for bit
    expected, got = adapter(reference), adapter(resumed)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[key], got[key]) for key in expected)


def jobs(tmp_path, model_dir, **sections):
    """Two identical jobs (reference and interrupted) in separate folders."""
    paths = []
    for name in ("reference", "interrupted"):
        folder = tmp_path / name
        folder.mkdir()
        paths.append(write_job(folder, model_dir, **sections))
    return paths


VARIANTS = {
    # 8 micro-batches per epoch (32 rows, micro-batch 4); checkpoint at `save_every`, killed later.
    "mid-epoch, dropout": dict(lora={"dropout": 0.1}, train={"max_steps": 6, "save_every": 2}, kill_before=6),
    "epoch boundary, grad_accum 2": dict(
        lora={"dropout": 0.1}, train={"max_steps": 7, "grad_accum_steps": 2, "save_every": 4}, kill_before=6
    ),
    "paged 8-bit, packing": dict(
        lora={"dropout": 0.1},
        data={"packing": True},
        train={"max_steps": 5, "micro_batch_size": 1, "save_every": 3, "optimizer": "paged_adamw_8bit"},
        kill_before=5,
    ),
    # hidden 256, r=16: 8-bit moments (the hidden-64 model's stay float32), re-allocated on load.
    "paged 8-bit, uint8 moments": dict(
        model="tiny256",
        lora={"r": 16, "alpha": 32},
        train={"max_steps": 4, "save_every": 2, "optimizer": "paged_adamw_8bit"},
        kill_before=4,
    ),
    "8-bit adamw, eval passes": dict(
        train={"max_steps": 6, "save_every": 2, "eval_every": 2, "optimizer": "adamw_8bit", "warmup_steps": 2},
        kill_before=4,
    ),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_killed_run_resumed_equals_the_uninterrupted_run(request, tmp_path, variant):
    sections = dict(VARIANTS[variant])
    kill_before = sections.pop("kill_before")
    model_dir = request.getfixturevalue(sections.pop("model", "tiny_model_dir"))
    reference, interrupted = jobs(tmp_path, model_dir, **sections)
    run(reference)

    with pytest.raises(Killed):
        run(interrupted, stop_requested=kill_before_step(kill_before))
    output = interrupted.parent / "out"
    assert not (output / "summary.json").exists()
    logged_before_resume = len(logged(output))

    result = run(interrupted)
    assert_same_run(reference.parent / "out", output)
    # Rows after the checkpoint were replaced, not duplicated.
    assert len(logged(output)) < logged_before_resume + sections["train"]["max_steps"]
    assert result.loop.steps == sections["train"]["max_steps"]


def test_data_order_after_resume_is_the_uninterrupted_order(tiny_model_dir, tmp_path):
    """Record the row ids of every micro-batch the loop consumes; resume across an epoch boundary."""
    tokenizer = load_tokenizer(str(tiny_model_dir))
    rows = data.read_rows([(str(write_chat_data(tmp_path / "rows.jsonl", 20, seed=3)), "auto")])
    examples = data.tokenize_rows(rows, tokenizer, 64, "completions", "truncate").examples

    def recording(log):
        class Recorded(list):
            def __getitem__(self, index):
                batch = list.__getitem__(self, index)
                log.append(batch.row_ids)
                return batch

        return lambda epoch: Recorded(
            data.epoch_batches(examples, 3, False, 64, tokenizer.pad_token_id, seed=7, epoch=epoch)
        )

    def model():
        return attach_lora(tiny_base(tiny_model_dir), LoraSection(r=8, alpha=16, dropout=0.1), seed=0)

    section = settings(max_steps=9, grad_accum_steps=2, save_every=3, max_grad_norm=1.0)  # 7 micro-batches per epoch
    uninterrupted = []
    train_tiny(model(), recording(uninterrupted), section=section)

    folder = tmp_path / "checkpoint"

    def keep_step_3(state):
        if state.step == 3:
            folder.mkdir()
            save_adapter(first, folder)
            save_training_state(folder, state, run={})
        return folder

    before_kill = []
    first = model()
    with pytest.raises(Killed):
        train_tiny(
            first,
            recording(before_kill),
            section=section,
            save_checkpoint=keep_step_3,
            stop_requested=kill_before_step(6),
        )
    state, _ = load_training_state(folder)
    assert (state.step, state.epoch, state.batch_index) == (3, 0, 6)

    after_resume = []
    resumed = model()
    load_adapter_weights(resumed, folder)
    train_tiny(resumed, recording(after_resume), section=section, resume=state)
    assert before_kill[:6] + after_resume == uninterrupted
    # 7 micro-batches per epoch, 2 per step, each epoch's last step short: 4 steps an epoch, 16 micro-batches in 9.
    assert len(uninterrupted) == 16 and len({tuple(ids) for ids in uninterrupted[:7]}) == 7


def cli_process(job, tmp_path, **env):
    environment = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        **{key: str(value) for key, value in env.items()},
    }
    return subprocess.Popen(
        [sys.executable, "-m", "tests.cli_with_faults", "train", str(job)],
        cwd=ROOT,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(condition, process, seconds=120):
    deadline = time.monotonic() + seconds
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def metrics_steps(output):
    path = output / "metrics.jsonl"
    return (
        [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]
        if path.exists()
        else []
    )


def test_sigkill_mid_checkpoint_write_then_rerun_finishes_the_same_run(tiny_model_dir, tmp_path):
    sections = dict(lora={"dropout": 0.1}, train={"max_steps": 6, "save_every": 2, "keep_checkpoints": 1})
    reference, interrupted = jobs(tmp_path, tiny_model_dir, **sections)
    run(reference)

    ready = tmp_path / "ready"
    process = cli_process(interrupted, tmp_path, QLORA_TEST_HANG_IN_SAVE=4, QLORA_TEST_READY=ready)
    wait_for(ready.exists, process)
    process.kill()
    process.communicate()
    checkpoints = interrupted.parent / "out" / "checkpoints"
    partial = Path(ready.read_text())
    assert (
        partial.parent == checkpoints
        and partial.name.startswith(".tmp-")
        and (partial / "training_state.json").exists()
    )
    assert [path.name for path in complete_checkpoints(checkpoints)] == ["step-00000002"]

    run(interrupted)
    assert_same_run(reference.parent / "out", interrupted.parent / "out")
    assert not partial.exists()


def test_sigterm_checkpoints_exits_75_and_the_rerun_finishes_the_same_run(tiny_model_dir, tmp_path):
    sections = dict(train={"max_steps": 10})  # no save_every: the stop itself must write the checkpoint
    reference, interrupted = jobs(tmp_path, tiny_model_dir, **sections)
    run(reference)

    output = interrupted.parent / "out"
    process = cli_process(interrupted, tmp_path, QLORA_TEST_STEP_DELAY=0.3)
    wait_for(lambda: len(metrics_steps(output)) >= 3, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == EXIT_INTERRUPTED, stderr
    last_step = metrics_steps(output)[-1]
    assert 1 <= last_step < 10
    assert [path.name for path in complete_checkpoints(output / "checkpoints")] == [f"step-{last_step:08d}"]
    assert (
        stderr.strip()
        .splitlines()[-1]
        .startswith(f"interrupted: stopped on request after step {last_step} of 10; checkpoint ")
    )
    assert not (output / "summary.json").exists()

    assert main(["train", str(interrupted)]) == 0
    assert_same_run(reference.parent / "out", output)


def test_a_second_ctrl_c_stops_at_once_without_a_checkpoint(tiny_model_dir, tmp_path):
    job = write_job(tmp_path, tiny_model_dir, train={"max_steps": 10})
    output = tmp_path / "out"
    mark = tmp_path / "forwards"
    process = cli_process(job, tmp_path, QLORA_TEST_STEP_DELAY=2.0, QLORA_TEST_FORWARD_MARK=mark)
    # Step 2's forward has begun (a metrics row of step 1 alone does not say so: a signal landing
    # between that row and step 2's stop check is acted on at once, before any forward).
    wait_for(lambda: mark.is_file() and mark.read_text() == "2", process)
    process.send_signal(signal.SIGINT)
    time.sleep(0.3)  # well inside step 2's 2 s forward: the first signal is not acted on before it ends
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == EXIT_ABORTED, stderr
    assert complete_checkpoints(output / "checkpoints") == []


def test_non_finite_loss_exits_6_and_keeps_the_last_good_checkpoint(tiny_model_dir, tmp_path):
    job = write_job(tmp_path, tiny_model_dir, train={"max_steps": 6, "save_every": 2, "keep_checkpoints": 1})
    process = cli_process(job, tmp_path, QLORA_TEST_NAN_AT_STEP=3)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == EXIT_TRAINING, stderr
    assert stderr.strip().splitlines()[-1] == "error: step 3: loss is nan; lower train.learning_rate or check the data"
    checkpoints = tmp_path / "out" / "checkpoints"
    (good,) = complete_checkpoints(checkpoints)
    assert good.name == "step-00000002"
    state, _ = load_training_state(good)
    assert state.step == 2 and all(
        torch.isfinite(tensor).all() for tensor in load_file(str(good / "adapter_model.safetensors")).values()
    )
    assert metrics_steps(tmp_path / "out") == [0, 1, 2]


# --------------------------------------------------------------------------- refusals


def digest(folder):
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def one_line_error(capsys):
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture
def interrupted_job(tiny_model_dir, tmp_path):
    job = write_job(tmp_path, tiny_model_dir, train={"max_steps": 6, "save_every": 2})
    with pytest.raises(Killed):
        run(job, stop_requested=kill_before_step(6))  # checkpoints at steps 2 and 4, step 5 logged
    return job


def test_a_changed_config_is_refused_unless_resume_anyway(interrupted_job, capsys):
    output = interrupted_job.parent / "out"
    before = digest(output)
    capsys.readouterr()
    assert (
        main(["train", str(interrupted_job), "--set", "train.learning_rate=0.002", "--set", "lora.r=4"])
        == EXIT_CHECKPOINT
    )
    message = one_line_error(capsys)
    assert (
        "lora.r: 8 -> 4" in message
        and "train.learning_rate: 0.001 -> 0.002" in message
        and "--resume-anyway" in message
    )
    assert digest(output) == before
    assert main(["train", str(interrupted_job), "--set", "train.learning_rate=0.002", "--resume-anyway"]) == 0
    assert [row["step"] for row in logged(output)] == [0, 1, 2, 3, 4, 5, 6]


def test_save_and_eval_frequency_may_change_on_resume(interrupted_job, capsys):
    assert main(["train", str(interrupted_job), "--set", "train.save_every=3", "--set", "train.eval_every=1"]) == 0
    assert "resuming from" in capsys.readouterr().out


def test_changed_data_is_refused(interrupted_job, capsys):
    write_chat_data(interrupted_job.parent / "train.jsonl", 32, seed=99)
    assert main(["train", str(interrupted_job)]) == EXIT_CHECKPOINT
    assert "the training or eval data" in one_line_error(capsys)


def test_missing_incomplete_and_damaged_checkpoints_are_named(interrupted_job, capsys):
    output = interrupted_job.parent / "out"
    checkpoints = output / "checkpoints"
    assert main(["train", str(interrupted_job), "--resume-from", str(checkpoints / "step-00000099")]) == EXIT_CHECKPOINT
    assert "not found" in one_line_error(capsys)

    torn = checkpoints / "step-00000001"
    torn.mkdir()
    assert main(["train", str(interrupted_job), "--resume-from", str(torn)]) == EXIT_CHECKPOINT
    assert "incomplete" in one_line_error(capsys)
    torn.rmdir()

    assert main(["train", str(interrupted_job), "--resume-from", str(checkpoints / "step-00000002")]) == EXIT_CHECKPOINT
    assert "holds later checkpoints (step-00000004)" in one_line_error(capsys)

    newest = complete_checkpoints(checkpoints)[-1]
    state_file = newest / "training_state.safetensors"
    damaged = bytearray(state_file.read_bytes())
    damaged[-1] ^= 0xFF
    state_file.write_bytes(bytes(damaged))
    before = digest(output)
    assert main(["train", str(interrupted_job)]) == EXIT_CHECKPOINT
    assert f"{state_file}: damaged" in one_line_error(capsys)
    assert digest(output) == before


def test_strict_adapter_reload_refuses_missing_and_unexpected_keys(tiny_model_dir, tmp_path):
    def model(targets):
        return attach_lora(
            tiny_base(tiny_model_dir), LoraSection(r=8, alpha=16, dropout=0.0, target_modules=targets), seed=0
        )

    saved = tmp_path / "attention-only"
    save_adapter(model(["q_proj", "v_proj"]), saved)
    with pytest.raises(CheckpointError, match=r"adapter does not match the model: \d+ missing keys \(first: .*k_proj"):
        load_adapter_weights(model(["q_proj", "k_proj", "v_proj"]), saved)
    with pytest.raises(
        CheckpointError, match=r"adapter does not match the model: \d+ unexpected keys \(first: .*v_proj"
    ):
        load_adapter_weights(model(["q_proj"]), saved)
    same = model(["q_proj", "v_proj"])
    load_adapter_weights(same, saved)


def test_checkpoint_state_holds_no_pickle(interrupted_job):
    newest = complete_checkpoints(interrupted_job.parent / "out" / "checkpoints")[-1]
    assert sorted(path.name for path in newest.iterdir()) == sorted(
        [
            "adapter_model.safetensors",
            "adapter_config.json",
            "README.md",
            "training_state.json",
            "training_state.safetensors",
            COMPLETE_MARKER,
        ]
    )
    record = json.loads((newest / "training_state.json").read_text())
    assert record["step"] == 4 and (record["epoch"], record["batch_index"]) == (0, 4)
    assert set(record["run"]) >= {"config", "config_sha256", "data_sha256", "versions"}
    assert [name for name, _ in record["rng"]["dict"]] == ["python", "numpy", "torch"]


def test_one_job_per_output_dir(interrupted_job, capsys):
    from qlora.output_dir import claim_output_dir

    output = interrupted_job.parent / "out"
    before = digest(output)
    with claim_output_dir(output, wipe=False):  # as a running job holds it
        capsys.readouterr()
        assert main(["train", str(interrupted_job)]) == 4
        assert "is in use by another running qlora job" in one_line_error(capsys)
        assert digest(output) == before


def test_checking_an_output_dir_while_another_process_checks_it_is_not_in_use(tmp_path):
    """The ranks of one job check the folder at the same moment: one's trial is no running job."""
    import fcntl

    from qlora.output_dir import OWNER_MARKER, claim_output_dir, in_use

    output = tmp_path / "out"
    with claim_output_dir(output, wipe=False):
        assert in_use(output)
    with open(output / OWNER_MARKER, "a") as other_rank:  # its trial, held while we check
        fcntl.flock(other_rank, fcntl.LOCK_SH | fcntl.LOCK_NB)
        assert not in_use(output)
    assert not in_use(output)


@pytest.fixture
def small_disk(tmpfs):
    return tmpfs("16m")


@pytest.mark.parametrize(
    "fill_at,what,last_good",
    [
        ("step-4", "the step-4 checkpoint", "step-00000002"),
        ("final", "the adapter, its tokenizer, manifest, plot and summary", "step-00000004"),
    ],
)
def test_a_full_disk_names_what_it_was_writing_exits_4_and_the_rerun_resumes(
    tiny_model_dir, tmp_path, small_disk, fill_at, what, last_good
):
    output = small_disk / "out"
    job = write_job(tmp_path, tiny_model_dir, train={"max_steps": 4, "save_every": 2}, output={"dir": str(output)})
    filler = small_disk / "filler"
    env = dict(os.environ, HF_HUB_OFFLINE="1", QLORA_TEST_FILL_DISK=fill_at, QLORA_TEST_FILLER=str(filler))
    command = [sys.executable, "-m", "tests.cli_with_faults", "train", str(job)]
    full = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert full.returncode == EXIT_OUTPUT, full.stderr
    errors = [line for line in full.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in full.stderr, full.stderr
    assert errors[0].startswith(f"error: no space left on device writing {what} to {output}")
    assert "it needs about" in errors[0] and " free; the last complete checkpoint is " in errors[0]
    assert errors[0].endswith(f"{output / 'checkpoints' / last_good}: free space and rerun to resume from it")
    # Nothing half-written is left to be taken for a good file.
    assert not list(output.rglob(".tmp-*")) and not list(output.glob(".artifacts-*"))
    assert not (output / "summary.json").exists()

    filler.unlink()
    env.pop("QLORA_TEST_FILL_DISK")
    rerun = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming from {output / 'checkpoints' / last_good}" in rerun.stdout + rerun.stderr
    steps = [json.loads(line)["step"] for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [step for step in steps if step > 0] == [1, 2, 3, 4]
    assert (output / "summary.json").exists() and (output / "adapter_model.safetensors").exists()
