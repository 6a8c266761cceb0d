"""One process vs 2 DDP ranks on this CPU, the same optimizer steps: for what it is worth.

    python bench/ddp_cpu.py [--steps 60] [--work /tmp/qlora-ddp-bench]

The demo job (configs/demo.yaml, exact match off, no checkpoints) twice: one process with
micro-batch 16 (torch's threads on every core), and `qlora train --nproc 2` with micro-batch 8 per
rank (one thread each: the cores split), so both train 16 rows per step, the same rows. Prints a
JSON line per run (whole-process wall time, supervised tokens/s of the loop, rank 0's peak RSS,
final losses) and one with the ratio. On a 2-core CPU the ranks share the same cores and add an
all-reduce per step: this shows the path works and what it costs, not a speed-up; on GPUs each
rank has its own device.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(name: str, output: Path, steps: int, extra: list[str]) -> dict:
    command = [
        sys.executable,
        "-m",
        "qlora.cli",
        "train",
        str(ROOT / "configs" / "demo.yaml"),
        "--overwrite",
        *("--set", f"output.dir={output}", "--set", f"train.max_steps={steps}"),
        *("--set", "train.eval_exact_match=0", "--set", "train.save_every=null", "--set", "train.eval_every=null"),
        *extra,
    ]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=environment())
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{name}: exit {done.returncode}: {done.stderr.strip().splitlines()[-1]}")
    summary = json.loads((output / "summary.json").read_text())
    return {
        "run": name,
        "steps": summary["steps"],
        "wall_s": round(wall, 2),
        "loop_s": round(summary["seconds"], 2),
        "supervised_tokens_per_s": round(summary["tokens_per_s"], 1),
        "peak_rss_mib_rank0": round(summary["peak_memory_bytes"] / 2**20),
        "final_loss": summary["final_loss"],
        "eval_loss": summary["eval_loss"],
    }


def environment() -> dict:
    # No OMP_NUM_THREADS: one process takes every core, torchrun gives each rank one thread.
    return {**{key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}, "HF_HUB_OFFLINE": "1"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--work", type=Path, default=Path("/tmp/qlora-ddp-bench"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    one = run("1 process, micro 16", args.work / "one", args.steps, [])
    print(json.dumps(one), flush=True)
    two = run(
        "2 ddp ranks, micro 8 each",
        args.work / "two",
        args.steps,
        ["--set", "train.micro_batch_size=8", "--nproc", "2"],
    )
    print(json.dumps(two), flush=True)
    print(
        json.dumps(
            {
                "ratio_wall_2_over_1": round(two["wall_s"] / one["wall_s"], 3),
                "ratio_tokens_per_s_2_over_1": round(
                    two["supervised_tokens_per_s"] / one["supervised_tokens_per_s"], 3
                ),
                "final_loss_difference": abs(two["final_loss"] - one["final_loss"]),
            }
        )
    )


if __name__ == "__main__":
    main()
