"""Several processes, for real: torch.distributed with gloo on this CPU, 2 ranks launched by
`qlora train --nproc 2` or by torchrun itself, on the tiny 4-bit model. No mocks: the ranks are
real processes, their collectives real, the faults real signals.

The reference is one 2-rank run (micro-batch 2, accumulation 1); one process accumulating 2
micro-batches of 2 must train the same steps, and interrupted / killed / two-"node" runs of the
same job must end with the same adapter.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from qlora.cli.launch import child_pids, without_nproc
from qlora.errors import QloraError
from qlora.training.distributed import World, agreed, world_from_env
from tests.tiny_launch import ROOT, STEPS, environment, make_job, metrics

FSDP = {"distributed": "fsdp", "micro_batch_size": 1, "grad_accum_steps": 2}


def launcher(job: Path, *arguments: str, nproc: int = 2, **env) -> subprocess.Popen:
    """`qlora train --nproc N` (through the fault-injecting entry point, which the ranks run too)."""
    command = [sys.executable, "-m", "tests.cli_with_faults", "train", str(job), *arguments]
    if nproc > 1:
        command += ["--nproc", str(nproc)]
    return subprocess.Popen(
        command, cwd=ROOT, env=environment(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(process: subprocess.Popen, seconds: float = 300) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=seconds)
    return process.returncode, out, err


def tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def wait_until(condition, process: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def copy_job(source: Path, directory: Path, model_dir: Path, **train) -> Path:
    """The reference job, in another folder (its own output), optionally with other train keys
    that change nothing trained (save_every)."""
    job = make_job(directory, model_dir, **train)
    assert (directory / "train.jsonl").read_bytes() == (source / "train.jsonl").read_bytes()
    return job


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    """One uninterrupted 2-rank run: its folder, and each rank's trainable weights."""
    directory = tmp_path_factory.mktemp("ddp-reference")
    # TensorBoard too (report_to is run-neutral): rank 0 alone must write events.
    job = make_job(directory, tiny_model_dir, report_to=["tensorboard"])
    (directory / "dump").mkdir()
    code, out, err = finish(launcher(job, QLORA_TEST_DUMP_WEIGHTS=directory / "dump"))
    assert code == 0, err
    return directory


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, tmp_path_factory):
    """The same job in one process, micro-batch 2 x accumulation 2: the rows of 2 ranks x 2 per step."""
    from qlora.config import load_config
    from qlora.job.run import run_job

    directory = tmp_path_factory.mktemp("one-process")
    # TensorBoard as the reference reports: the two runs must leave the same files.
    job = make_job(directory, tiny_model_dir, grad_accum_steps=2, report_to=["tensorboard"])
    run_job(load_config(job), echo=lambda line: None)
    return directory


@pytest.fixture(scope="module")
def fsdp_reference(tiny_model_dir, tmp_path_factory):
    """One uninterrupted 2-rank FSDP run (the 4-bit base sharded, rank 0 alone reading it), each
    rank accumulating 2 micro-batches of 1: a step's rows are still one process's 2 x 2."""
    directory = tmp_path_factory.mktemp("fsdp-reference")
    code, out, err = finish(launcher(make_job(directory, tiny_model_dir, **FSDP)))
    assert code == 0, err
    assert "fsdp: the base and adapters sharded over 2 rank(s)" in out
    return directory


def assert_same_steps(single: list[dict], ranks: list[dict], tolerance: float) -> None:
    assert [row["step"] for row in single] == [row["step"] for row in ranks] == list(range(STEPS + 1))
    for one, two in zip(single, ranks):
        assert one.get("supervised_tokens") == two.get("supervised_tokens")
        for key in ("loss", "eval_loss"):
            if key in one:
                assert two[key] == pytest.approx(one[key], rel=tolerance, abs=tolerance), (one["step"], key)


def assert_close_adapters(first: Path, second: Path, tolerance: float) -> None:
    one, two = tensors(first / "adapter_model.safetensors"), tensors(second / "adapter_model.safetensors")
    assert one.keys() == two.keys() and one
    for name, value in one.items():
        assert (two[name] - value).abs().max().item() <= tolerance, name


def test_two_ranks_train_the_steps_of_one_process_accumulating_both(reference, one_process):
    from qlora import data
    from qlora.config import load_config
    from qlora.job.prepared import prepare_data

    assert_same_steps(metrics(one_process / "out"), metrics(reference / "out"), 1e-5)
    assert_close_adapters(one_process / "out", reference / "out", 1e-5)
    # The replicas never drift apart.
    rank0, rank1 = (
        tensors(reference / "dump" / "rank-0.safetensors"),
        tensors(reference / "dump" / "rank-1.safetensors"),
    )
    assert rank0.keys() == rank1.keys() and all(rank0[name].equal(rank1[name]) for name in rank0)
    # Rank 1 wrote nothing of its own: the same files as one process.
    assert sorted(path.name for path in (one_process / "out").iterdir()) == sorted(
        path.name for path in (reference / "out").iterdir()
    )
    # The normalization mattered: the ranks' halves of a step hold very different token counts.
    prepared = prepare_data(load_config(one_process / "job.yaml"), echo=lambda line: None)
    batches = data.epoch_batches(prepared.train.examples, 2, False, 64, prepared.tokenizer.pad_token_id, 0, 0)
    halves = [(batches[i].supervised_tokens, batches[i + 1].supervised_tokens) for i in range(0, 2 * STEPS, 2)]
    assert max(max(pair) / min(pair) for pair in halves) > 2, halves


@pytest.mark.parametrize(
    "strategy,rows,per_rank,single",
    [("ddp", 30, {}, {"grad_accum_steps": 2}), ("fsdp", 29, FSDP, {"micro_batch_size": 1, "grad_accum_steps": 4})],
)
def test_an_epochs_short_last_step_trains_every_row_once_on_two_ranks_as_in_one_process(
    tiny_model_dir, tmp_path, strategy, rows, per_rank, single
):
    """`epochs: 1`, 8 steps, the last of ONE micro-batch: rank 0 trains it while rank 1 runs an
    uncounted filler (DDP's all-reduce and FSDP's gathers must meet); the steps of one process."""
    from qlora.config import load_config
    from qlora.job.prepared import prepare_data
    from qlora.job.run import run_job

    steps = {"max_steps": None, "epochs": 1, "eval_every": None}
    code, out, err = finish(launcher(make_job(tmp_path / "ranks", tiny_model_dir, rows=rows, **steps, **per_rank)))
    assert code == 0, err
    single_job = make_job(tmp_path / "single", tiny_model_dir, rows=rows, **steps, **single)
    run_job(load_config(single_job), echo=lambda line: None)
    single, ranks = ([row for row in metrics(tmp_path / run / "out") if "loss" in row] for run in ("single", "ranks"))
    assert [row["step"] for row in ranks] == [row["step"] for row in single] == list(range(1, 9))
    for one, two in zip(single, ranks):
        assert one["supervised_tokens"] == two["supervised_tokens"]
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-4, abs=1e-4), one["step"]
    assert_close_adapters(tmp_path / "single" / "out", tmp_path / "ranks" / "out", 1e-4)
    prepared = prepare_data(load_config(single_job), echo=lambda line: None)
    assert sum(row["supervised_tokens"] for row in ranks) == prepared.train.stats["supervised_tokens"]


def test_fsdp_ranks_train_the_steps_of_one_process_and_the_adapter_loads_in_plain_peft(fsdp_reference, one_process):
    import torch
    from peft import PeftModel

    from tests.tiny_adapters import plain_4bit_base

    assert_same_steps(metrics(one_process / "out"), metrics(fsdp_reference / "out"), 1e-4)
    assert_close_adapters(one_process / "out", fsdp_reference / "out", 1e-4)
    manifest = json.loads((fsdp_reference / "out" / "qlora_manifest.json").read_text())
    assert manifest["training"] == {"world_size": 2, "strategy": "fsdp"}
    # Sharding stores the 4-bit bytes as float32: still counted as the weights they hold.
    summaries = [json.loads((run / "out" / "summary.json").read_text()) for run in (one_process, fsdp_reference)]
    assert summaries[0]["total_parameters"] == summaries[1]["total_parameters"]
    model_dir = Path(yaml.safe_load((fsdp_reference / "job.yaml").read_text())["model"]["name_or_path"])
    inputs = torch.arange(3, 40).reshape(1, -1)
    logits = []
    for output in (one_process / "out", fsdp_reference / "out"):
        model = PeftModel.from_pretrained(plain_4bit_base(model_dir), str(output)).eval()
        with torch.no_grad():
            logits.append(model(input_ids=inputs).logits)
    assert (logits[0] - logits[1]).abs().max().item() <= 1e-4


def test_fsdp_sigterm_to_one_rank_stops_all_checkpoints_every_optimizer_shard_and_resumes_bitwise(
    fsdp_reference, tiny_model_dir, tmp_path
):
    job = copy_job(fsdp_reference, tmp_path / "job", tiny_model_dir, **FSDP)
    output = tmp_path / "job" / "out"
    process = launcher(job, QLORA_TEST_STEP_DELAY=0.4)
    wait_until(lambda: len(metrics(output)) >= 3, process)
    # Rank 1 alone is told: the ranks agree on the stop flag, so rank 0 stops after the same step.
    os.kill(rank_pid(process, 1), signal.SIGTERM)
    code, out, err = finish(process)
    assert code == 75, err
    assert err.count("interrupted: stopped on request") == 1, err
    (checkpoint,) = sorted((output / "checkpoints").glob("step-*"))
    state = json.loads((checkpoint / "training_state.json").read_text())
    assert state["optimizer"]["dict"][0][0] == "ranks"  # each rank's shard of the optimizer state
    # One process cannot take over sharded optimizer state, even when asked to.
    elsewhere = tmp_path / "copy"
    shutil.copytree(tmp_path / "job", elsewhere)
    code, out, err = finish(launcher(elsewhere / "job.yaml", "--resume-anyway", nproc=1))
    assert code == 7 and "trained on 2 process(es) with fsdp, this run has 1" in err, err

    code, out, err = finish(launcher(job))
    assert code == 0, err
    final, uninterrupted = (
        tensors(output / "adapter_model.safetensors"),
        tensors(fsdp_reference / "out" / "adapter_model.safetensors"),
    )
    assert all(final[name].equal(uninterrupted[name]) for name in uninterrupted)


def test_the_manifest_and_the_run_record_name_the_world(reference):
    output = reference / "out"
    manifest = json.loads((output / "qlora_manifest.json").read_text())
    assert manifest["training"] == {"world_size": 2, "strategy": "ddp"}
    assert len(metrics(output)) == STEPS + 1  # one row per step: rank 1 logs nothing
    assert json.loads((output / "summary.json").read_text())["steps"] == STEPS


def test_only_rank_0_reports_to_the_trackers(reference):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output = reference / "out"
    assert len(list((output / "tensorboard").glob("events.out.tfevents.*"))) == 1
    events = EventAccumulator(str(output / "tensorboard"))
    events.Reload()
    logged = [(event.step, event.value) for event in events.Scalars("loss")]
    rows = [row for row in metrics(output) if "loss" in row]
    assert logged == [(row["step"], pytest.approx(row["loss"], rel=1e-6)) for row in rows]


def test_sigterm_stops_every_rank_after_the_same_step_and_the_rerun_is_the_same_run(
    reference, tiny_model_dir, tmp_path
):
    job = copy_job(reference, tmp_path / "job", tiny_model_dir)
    output = tmp_path / "job" / "out"
    process = launcher(job, QLORA_TEST_STEP_DELAY=0.4)
    wait_until(lambda: len(metrics(output)) >= 3, process)  # steps 0 (eval), 1, 2 logged
    process.send_signal(signal.SIGTERM)
    code, out, err = finish(process)
    # 75 from the launcher means every rank exited 75 (qlora.cli.launch.ranks_code).
    assert code == 75, err
    assert err.count("interrupted: stopped on request") == 1, err
    checkpoints = sorted((output / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "COMPLETE").is_file()
    stopped_at = int(checkpoints[0].name.split("-")[1])
    assert 2 <= stopped_at < STEPS
    state = json.loads((checkpoints[0] / "training_state.json").read_text())
    assert state["run"]["world_size"] == 2 and len(state["rng"]["dict"]) == 1  # {"ranks": [rank 0, rank 1]}
    assert len(state["rng"]["dict"][0][1]["list"]) == 2

    # Another world size: refused with both sizes named, exit 7; --resume-anyway continues.
    elsewhere = tmp_path / "copy"
    shutil.copytree(tmp_path / "job", elsewhere)
    code, out, err = finish(launcher(elsewhere / "job.yaml", nproc=1))
    assert code == 7 and "trained on 2 process(es), this run has 1" in err, err
    assert len(err.strip().splitlines()) == 1
    code, out, err = finish(launcher(elsewhere / "job.yaml", "--resume-anyway", nproc=1))
    assert code == 0, err
    assert "warning: resuming a 2-process checkpoint on 1 processes" in out + err

    code, out, err = finish(launcher(job))
    assert code == 0, err
    assert f"resuming from {checkpoints[0]}" in out
    final, uninterrupted = (
        tensors(output / "adapter_model.safetensors"),
        tensors(reference / "out" / "adapter_model.safetensors"),
    )
    assert all(final[name].equal(uninterrupted[name]) for name in uninterrupted)  # bitwise


def test_kill_9_of_one_rank_then_the_rerun_resumes_from_the_last_complete_checkpoint(
    reference, tiny_model_dir, tmp_path
):
    job = copy_job(reference, tmp_path, tiny_model_dir, save_every=2)
    output = tmp_path / "out"
    process = launcher(job, QLORA_TEST_STEP_DELAY=0.4)
    wait_until(lambda: (output / "checkpoints" / "step-00000002" / "COMPLETE").is_file(), process)
    os.kill(rank_pid(process, 1), signal.SIGKILL)
    code, out, err = finish(process)
    assert code == 128 + signal.SIGKILL, err
    code, out, err = finish(launcher(job))
    assert code == 0, err
    assert "resuming from" in out and "step-0000000" in out
    final, uninterrupted = (
        tensors(output / "adapter_model.safetensors"),
        tensors(reference / "out" / "adapter_model.safetensors"),
    )
    assert all(final[name].equal(uninterrupted[name]) for name in uninterrupted)


def test_two_nodes_train_the_steps_of_one_node_with_two_processes(reference, tiny_model_dir, tmp_path):
    job = copy_job(reference, tmp_path, tiny_model_dir)
    port = free_port()
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--node-rank",
                str(node),
                "--nproc-per-node",
                "1",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                f"127.0.0.1:{port}",
                "--rdzv-id",
                "two-nodes",
                "-m",
                "tests.cli_with_faults",
                "train",
                str(job),
            ],
            cwd=ROOT,
            env=environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in (0, 1)
    ]
    for node in nodes:
        code, out, err = finish(node)
        assert code == 0, err
    assert_same_steps(metrics(reference / "out"), metrics(tmp_path / "out"), 1e-6)
    final, reference_adapter = (
        tensors(tmp_path / "out" / "adapter_model.safetensors"),
        tensors(reference / "out" / "adapter_model.safetensors"),
    )
    assert all((final[name] - value).abs().max().item() <= 1e-6 for name, value in reference_adapter.items())


def test_accelerate_launch_trains_the_steps_of_torchrun(reference, tiny_model_dir, tmp_path):
    """`accelerate launch` is the other launcher users have: the same environment, the same run."""
    job = copy_job(reference, tmp_path, tiny_model_dir)
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    process = subprocess.Popen(
        [
            *accelerate,
            *("--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port"),
            str(free_port()),
            *("-m", "tests.cli_with_faults", "train", str(job)),
        ],
        cwd=ROOT,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    code, out, err = finish(process)
    assert code == 0, err
    assert "ddp: a replica on each of 2 ranks" in out
    assert_same_steps(metrics(reference / "out"), metrics(tmp_path / "out"), 1e-6)
    assert_close_adapters(reference / "out", tmp_path / "out", 1e-6)


def test_a_batch_the_ranks_cannot_split_fails_every_rank_before_loading(tiny_model_dir, tmp_path):
    job = make_job(tmp_path, tiny_model_dir, micro_batch_size="auto", effective_batch_size=3, memory_budget="4GiB")
    code, out, err = finish(launcher(job))
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert lines == [
        "error: train.effective_batch_size: 3 sequences per step cannot be split evenly over 2 processes; "
        "use a multiple of 2"
    ], err
    assert not (tmp_path / "out").exists()  # nothing written


def test_fsdp_with_an_8_bit_base_is_refused_by_the_config(tiny_model_dir, tmp_path, capsys):
    from qlora.cli.main import main

    job = make_job(tmp_path, tiny_model_dir, distributed="fsdp")
    assert main(["validate", str(job), "--set", "quantization.bits=8"]) == 2
    assert "train.distributed: fsdp shards 4-bit or 16-bit bases" in capsys.readouterr().err


def test_world_from_the_environment():
    assert world_from_env(environ={}) == world_from_env("fsdp", environ={}) == World()
    assert world_from_env("fsdp", {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == World(3, 4, 1, "fsdp", True)
    with pytest.raises(QloraError, match="RANK 4 is outside WORLD_SIZE 4"):
        world_from_env(environ={"WORLD_SIZE": "4", "RANK": "4"})
    with pytest.raises(QloraError, match="must be integers"):
        world_from_env(environ={"WORLD_SIZE": "two"})


def test_one_process_agrees_with_itself():
    assert agreed(World(), lambda: 5) == 5
    with pytest.raises(QloraError, match="bad"):
        agreed(World(), lambda: (_ for _ in ()).throw(QloraError("bad")))


def test_the_ranks_run_our_command_line_without_nproc():
    assert without_nproc(["train", "job.yaml", "--nproc", "2", "--set", "a=1"]) == ["train", "job.yaml", "--set", "a=1"]
    assert without_nproc(["train", "--nproc=8", "job.yaml"]) == ["train", "job.yaml"]


def rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The process of one rank among the launcher's children (its environment names its RANK)."""
    entry = f"RANK={rank}".encode()  # a whole entry: LOCAL_RANK=1 must not match
    return next(
        pid for pid in child_pids(launcher.pid) if entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
