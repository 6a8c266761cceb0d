"""Preference jobs (train.objective dpo / orpo) on several processes, for real: `qlora train --nproc 2`
(gloo on this CPU) under DDP and under FSDP, on the tiny 4-bit model, against one process training
the same steps with the same effective batch (its accumulation window = both ranks' micro-batches).

The job is built so that every part of the split shows: 9 pairs, `epochs: 1`, so the last step is
short (one micro-batch: rank 0 trains it, rank 1 runs an uncounted filler) and the ranks' halves of
a step differ in pairs and chosen tokens; 5 eval pairs, so the eval batches do not split evenly over
the ranks either. The losses (per pair over the whole window, ORPO's NLL per chosen token of the
whole window) and every reading (rewards/*, logps/*, eval_*: means over every rank's pairs) must
be one process's.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qlora.errors import EXIT_DATA
from tests.tiny import write_job
from tests.tiny_launch import ROOT, environment, metrics
from tests.tiny_pairs import string_pair, write_pairs

WORLD = 2
TRAIN_PAIRS, EVAL_PAIRS = 9, 5
# (the 2-rank job's batch keys, one process's with the same effective batch)
SPLITS = {
    "ddp": ({"micro_batch_size": 2, "grad_accum_steps": 1}, {"micro_batch_size": 2, "grad_accum_steps": 2}),
    "fsdp": (
        {"distributed": "fsdp", "micro_batch_size": 1, "grad_accum_steps": 2},
        {"micro_batch_size": 1, "grad_accum_steps": 4},
    ),
}
# Per-process measurements, not the trained numbers: they differ by machine and by world size.
UNCOMPARED = {"tokens_per_s", "elapsed_s", "mfu"}
# Largest difference of any metric (absolute; relative above 1) and of any adapter weight, measured
# on this CPU: ddp 7.2e-8 and 0 (dpo, orpo alike); fsdp 1.1e-6 and 3.9e-6 (its flat shards sum the
# gradients in another order). SFT's own tests allow 1e-5 (ddp) and 1e-4 (fsdp).
TOLERANCE = {"ddp": 1e-6, "fsdp": 2e-5}


def preference_job(directory: Path, model_dir: Path, objective: str, **train) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    write_pairs(directory / "train.jsonl", TRAIN_PAIRS, seed=1)
    write_pairs(directory / "eval.jsonl", EVAL_PAIRS, seed=2)
    return write_job(
        directory,
        model_dir,
        train={
            "objective": objective,
            "max_steps": None,
            "epochs": 1,
            "eval_every": 2,
            "dpo_beta": 0.5,
            "learning_rate": 5e-3,
            **train,
        },
    )


def launch(job: Path, nproc: int = WORLD) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "qlora.cli", "train", str(job), "--nproc", str(nproc)]
    return subprocess.run(
        command, cwd=ROOT, env=environment(OMP_NUM_THREADS=1), capture_output=True, text=True, timeout=600
    )


def tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def largest_difference(single: list[dict], ranks: list[dict]) -> tuple[float, str]:
    """(the largest difference of any trained number of any row, where it is): absolute, relative
    above 1 (perplexities); the rows and their keys must match."""
    assert [row["step"] for row in ranks] == [row["step"] for row in single]
    largest = (0.0, "")
    for one, two in zip(single, ranks):
        assert one.keys() == two.keys(), one["step"]
        for key in sorted(one.keys() - UNCOMPARED):
            if isinstance(one[key], (int, float)):
                difference = abs(one[key] - two[key]) / max(1.0, abs(one[key]))
                largest = max(largest, (difference, f"step {one['step']} {key}"))
    return largest


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_two_ranks_train_the_preference_steps_of_one_process(tiny_model_dir, tmp_path, strategy, objective):
    from qlora.cli.main import main

    ranks_keys, single_keys = SPLITS[strategy]
    finished = launch(preference_job(tmp_path / "ranks", tiny_model_dir, objective, **ranks_keys))
    assert finished.returncode == 0, finished.stderr[-4000:]
    banner = "fsdp: the base and adapters sharded over 2 rank(s)" if strategy == "fsdp" else "ddp: a replica on each"
    assert banner in finished.stdout
    assert main(["train", str(preference_job(tmp_path / "single", tiny_model_dir, objective, **single_keys))]) == 0

    single, ranks = (metrics(tmp_path / run / "out") for run in ("single", "ranks"))
    assert [row["step"] for row in ranks] == [0, 1, 2, 3]  # 9 pairs: 4 + 4 + the short last step's 1
    assert all(name in row for row in ranks[1:] for name in ("rewards/accuracy", "logps/accuracy"))
    assert [row["step"] for row in ranks if "eval_rewards/accuracy" in row] == [0, 2, 3]
    difference, where = largest_difference(single, ranks)
    print(f"{strategy} {objective}: largest difference {difference:.3g} ({where})")
    assert difference <= TOLERANCE[strategy], where
    one, two = (tensors(tmp_path / run / "out" / "adapter_model.safetensors") for run in ("single", "ranks"))
    assert one.keys() == two.keys() and one
    adapter_difference = max((one[name] - two[name]).abs().max().item() for name in one)
    print(f"{strategy} {objective}: adapters apart by {adapter_difference:.3g}")
    assert adapter_difference <= TOLERANCE[strategy]
    summary = json.loads((tmp_path / "ranks" / "out" / "summary.json").read_text())
    assert summary["rewards/accuracy"] == pytest.approx(ranks[-1]["rewards/accuracy"])
    # it trained: the rewards moved away from the reference's zero (DPO) and the loss fell
    assert ranks[-1]["rewards/margin"] != 0.0 and ranks[-1]["eval_loss"] < ranks[0]["eval_loss"]


def test_fsdp_with_a_reference_adapter_trains_the_steps_of_one_process(tiny_model_dir, trained_adapter, tmp_path):
    """SFT -> DPO under FSDP: started from the SFT adapter and scored against it (a frozen second
    adapter, its LoRA linears FSDP units of their own). In float32 the 2 ranks train one process's
    steps; in bf16, where its float32 weights beside the bf16 base once failed to flatten, the
    reference is the start adapter at step 0 (loss ln 2, rewards 0: it is really applied)."""
    from qlora.cli.main import main

    adapters = {"name_or_path": str(tiny_model_dir), "adapter": str(trained_adapter)}
    adapters["reference_adapter"] = str(trained_adapter)

    def job(name, compute_dtype="float32", **train):
        path = preference_job(tmp_path / name, tiny_model_dir, "dpo", **train)
        content = yaml.safe_load(path.read_text())
        content["model"], content["lora"] = adapters, {"dropout": 0.0}  # the adapter's shape is the job's
        content.setdefault("quantization", {})["compute_dtype"] = compute_dtype
        path.write_text(yaml.safe_dump(content))
        return path

    finished = launch(job("ranks", **SPLITS["fsdp"][0]))
    assert finished.returncode == 0, finished.stderr[-4000:]
    assert "dpo reference: the base with" in finished.stdout
    assert "fsdp: the base and adapters sharded" in finished.stdout
    assert main(["train", str(job("single", **SPLITS["fsdp"][1]))]) == 0
    single, ranks = (metrics(tmp_path / run / "out") for run in ("single", "ranks"))
    difference, where = largest_difference(single, ranks)
    print(f"fsdp dpo with a reference adapter: largest difference {difference:.3g} ({where})")
    assert difference <= TOLERANCE["fsdp"], where
    one, two = (tensors(tmp_path / run / "out" / "adapter_model.safetensors") for run in ("single", "ranks"))
    assert one.keys() == two.keys() == tensors(trained_adapter / "adapter_model.safetensors").keys()
    assert max((one[name] - two[name]).abs().max().item() for name in one) <= TOLERANCE["fsdp"]
    assert ranks[0]["eval_loss"] == pytest.approx(0.693147, abs=1e-6) and ranks[-1]["rewards/margin"] != 0.0

    finished = launch(job("bf16", compute_dtype="bfloat16", **SPLITS["fsdp"][0]))
    assert finished.returncode == 0, finished.stderr[-4000:]
    start = metrics(tmp_path / "bf16" / "out")[0]
    assert start["eval_loss"] == pytest.approx(0.693147, abs=1e-6) and start["eval_rewards/margin"] == 0.0


def test_a_bad_preference_row_fails_every_rank_with_one_line(tiny_model_dir, tmp_path):
    job = preference_job(tmp_path, tiny_model_dir, "dpo", **SPLITS["ddp"][0])
    with open(tmp_path / "train.jsonl", "a") as handle:
        handle.write(json.dumps({**string_pair("abc"), "rejected": string_pair("abc")["chosen"]}) + "\n")
    expected = [
        f"error: {tmp_path / 'train.jsonl'}:{TRAIN_PAIRS + 1}: 'chosen' and 'rejected' are identical, "
        "so there is no preference to learn"
    ]
    finished = launch(job)
    assert finished.returncode == EXIT_DATA, finished.stderr[-4000:]
    assert [line for line in finished.stderr.splitlines() if line.startswith("error:")] == expected, finished.stderr
    assert "Traceback" not in finished.stderr
    assert not (tmp_path / "out").exists()  # nothing written
    # torchrun itself reports each rank's exit code: both ranks failed, with the same code, and
    # rank 0 alone printed the error.
    torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={WORLD}", "-m", "qlora.cli"]
    finished = subprocess.run(
        [*torchrun, "train", str(job)], cwd=ROOT, env=environment(OMP_NUM_THREADS=1), capture_output=True, text=True
    )
    assert finished.returncode != 0
    assert [line for line in finished.stderr.splitlines() if line.startswith("error:")] == expected, finished.stderr
    codes = re.findall(r"rank\s+: (\d+) \(local_rank: \d+\)\n\s+exitcode\s+: (-?\d+)", finished.stderr)
    assert sorted(codes) == [(str(rank), str(EXIT_DATA)) for rank in range(WORLD)], finished.stderr
