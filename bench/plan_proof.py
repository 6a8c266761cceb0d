"""Prove `qlora plan` at real size: QLoRA steps on a random-weight base vs the planned memory.

For each architecture (a configs/arch name or a folder with config.json) it runs a normal job in
a fresh process with `model.init: random` (the base is built straight into NF4, one linear at a
time, never as a 16-bit model), micro_batch x seq_len tokens of synthetic text per step, and
prints ONE JSON line: device, planned vs measured peak allocated / reserved memory, their
ratio, tokens/s measured and the plan's tokens/s at the stated utilization.

    python bench/plan_proof.py                          # llama-3.1-8b and llama-3.3-70b, seq 2048
    python bench/plan_proof.py --models llama-3.2-1b --seq-len 4096 --steps 8

Needs a CUDA GPU for the memory numbers (on CPU it runs, and reports the peak RSS instead).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["llama-3.1-8b", "llama-3.3-70b"])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--mfu", type=float, default=0.4, help="utilization the plan's tokens/s assumes")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="extra job overrides"
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one model in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(prove(args.one, args)), flush=True)
        return 0
    status = 0
    for model in args.models:
        # A fresh process per model: peak-memory counters and the CUDA context start clean.
        command = [
            sys.executable,
            __file__,
            "--one",
            model,
            "--seq-len",
            str(args.seq_len),
            "--micro-batch",
            str(args.micro_batch),
            "--steps",
            str(args.steps),
            "--mfu",
            str(args.mfu),
        ] + [f"--set={item}" for item in args.overrides]
        result = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
        print(
            lines[-1] if lines else json.dumps({"model": model, "error": f"exit code {result.returncode}"}), flush=True
        )
        status = status or result.returncode
    return status


def write_job(folder: Path, model: str, args) -> Path:
    """A text job whose every row fills seq_len tokens (the demo tokenizer is byte-level)."""
    import yaml

    rng = random.Random(0)
    rows = args.steps * args.micro_batch + 8
    with open(folder / "train.jsonl", "w") as handle:
        for _ in range(rows):
            text = " ".join(
                "".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 9))) for _ in range(args.seq_len)
            )
            handle.write(json.dumps({"text": text[: args.seq_len * 2]}) + "\n")
    job = {
        "model": {"name_or_path": model, "init": "random", "tokenizer": str(ROOT / "qlora" / "demo" / "model")},
        "data": {
            "train": "train.jsonl",
            "format": "text",
            "train_on": "all",
            "max_seq_len": args.seq_len,
            "too_long": "truncate",
        },
        "train": {"max_steps": args.steps, "micro_batch_size": args.micro_batch, "grad_accum_steps": 1, "log_every": 1},
        "output": {"dir": "out"},
    }
    (folder / "job.yaml").write_text(yaml.safe_dump(job))
    return folder / "job.yaml"


def prove(model: str, args) -> dict:
    import torch

    from qlora.config import load_config
    from qlora.errors import QloraError
    from qlora.job.run import run_job
    from qlora.plan.architecture import load_architecture
    from qlora.plan.budget import read_budget
    from qlora.plan.checkpointing_mode import resolve_checkpointing
    from qlora.plan.memory import make_plan
    from qlora.plan.settings import settings_from_job

    with tempfile.TemporaryDirectory(prefix="plan-proof-") as folder:
        config = load_config(write_job(Path(folder), model, args), args.overrides)
        # Plan the mode that trains: gradient_checkpointing auto chooses it here as the job would.
        resolve_checkpointing(
            config, read_budget(config.train.memory_budget), echo=lambda line: print(line, file=sys.stderr)
        )
        plan = make_plan(load_architecture(config.model.name_or_path), settings_from_job(config))
        on_cuda = torch.cuda.is_available()
        device = torch.cuda.get_device_name() if on_cuda else "cpu"
        record = {
            "model": model,
            "device": device,
            "seq_len": args.seq_len,
            "micro_batch": args.micro_batch,
            "steps": args.steps,
            "gradient_checkpointing": config.train.gradient_checkpointing,
            "planned_allocated_bytes": plan.allocated_bytes,
            "planned_reserved_bytes": plan.reserved_bytes,
            "planned_total_bytes": plan.total_bytes,
            "planned_paged_bytes": plan.paged_bytes,
        }
        try:
            result = run_job(config, echo=lambda line: print(line, file=sys.stderr))
        except (QloraError, torch.OutOfMemoryError) as error:
            record["error"] = f"{error.__class__.__name__}: {str(error).splitlines()[0]}"
            if on_cuda:  # how far it got: a lower bound of the real peak when the plan was optimistic
                record["measured_allocated_bytes_before_error"] = torch.cuda.max_memory_allocated()
            return record
        loop = result.loop
        # Every token is supervised (train_on all). The first step (CUDA warm-up, kernel autotuning)
        # is left out of the rate; the whole-loop rate is kept beside it.
        steps = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
        steps = [row for row in steps if "loss" in row]
        record["tokens_per_s_with_first_step"] = loop.tokens / loop.seconds
        record["tokens_per_s"] = record["tokens_per_s_with_first_step"]
        if len(steps) >= 2 and steps[-1]["elapsed_s"] > steps[0]["elapsed_s"]:
            per_step = loop.tokens / loop.steps
            record["tokens_per_s"] = per_step * (len(steps) - 1) / (steps[-1]["elapsed_s"] - steps[0]["elapsed_s"])
        record["final_loss"] = loop.final_loss
        if on_cuda:
            allocated, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
            record.update(
                measured_allocated_bytes=allocated,
                measured_reserved_bytes=reserved,
                allocated_plan_over_measured=plan.allocated_bytes / allocated,
                reserved_plan_over_measured=plan.reserved_bytes / reserved,
            )
            gpu = gpu_from_device_name(device)
            if gpu is not None:
                record["planned_tokens_per_s"] = gpu.bf16_tflops * 1e12 * args.mfu / plan.flops_per_token
                record["gpu_spec"] = gpu.name
        else:
            record["measured_peak_rss_bytes"] = loop.peak_memory_bytes
        return record


def gpu_from_device_name(device: str):
    """The configs/hardware/gpus.yaml entry whose name appears in the CUDA device name (longest match wins)."""
    from qlora.plan.hardware import load_gpus

    name = device.upper().replace(" ", "-")
    matches = [gpu for key, gpu in load_gpus().items() if key.upper().removeprefix("RTX-") in name]
    if "PCIE" not in name:
        matches = [gpu for gpu in matches if "PCIE" not in gpu.name.upper()]
    return max(matches, key=lambda gpu: len(gpu.name), default=None)


if __name__ == "__main__":
    sys.exit(main())
