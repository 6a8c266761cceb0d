"""CPU time of one forward + backward per gradient-checkpointing mode (issue 7; BENCHMARKS.md).

    OMP_NUM_THREADS=1 python bench/checkpointing_probe.py true --steps 6
    OMP_NUM_THREADS=1 python bench/checkpointing_probe.py selective --steps 6
    OMP_NUM_THREADS=1 python bench/checkpointing_probe.py false --steps 6

One mode per process: bench/compare.py's fixture model (built once in --work), NF4 + LoRA r=16
on all linears, dropout 0.05, float32, one padding-free micro-batch of 4 rows (61 + 107 + 160 +
300 = 628 tokens, random ids), loss summed over every position. Process CPU time per step is the
measure (robust to other work on the machine, unlike wall time); the loss and a digest of the
LoRA gradients show every mode computes the same numbers. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROWS = (61, 107, 160, 300)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    import torch.nn.functional as F

    model = probe_model(Path(args.work), {"true": True, "false": False, "selective": "selective"}[args.mode])
    ids, positions = probe_batch()
    targets = torch.roll(ids, -1, 1)
    lora = [parameter for parameter in model.parameters() if parameter.requires_grad]

    def step() -> float:
        torch.manual_seed(5)  # the same dropout masks every step and every mode
        logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
        loss.backward()
        return loss.item()

    loss = step()
    digest = hashlib.sha256(torch.cat([parameter.grad.flatten() for parameter in lora]).numpy().tobytes()).hexdigest()[
        :16
    ]
    seconds = []
    for _ in range(args.steps):
        model.zero_grad(set_to_none=True)
        started = time.process_time()
        step()
        seconds.append(round(time.process_time() - started, 3))
    print(
        json.dumps(
            {
                "gradient_checkpointing": args.mode,
                "tokens": sum(ROWS),
                "threads": torch.get_num_threads(),
                "loss": loss,
                "lora_grad_sha256": digest,
                "cpu_s_per_step": seconds,
                "mean_cpu_s": round(sum(seconds) / len(seconds), 3),
            }
        )
    )
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["true", "selective", "false"], help="train.gradient_checkpointing")
    parser.add_argument("--steps", type=int, default=6, help="timed steps, after one warm-up step")
    parser.add_argument(
        "--work", default=os.path.join(tempfile.gettempdir(), "qlora-bench-checkpointing"), help="fixture model folder"
    )
    return parser.parse_args(argv)


def probe_model(folder: Path, mode):
    """The fixture model (built on first use) in NF4 with LoRA r=16 on all linears, in train mode."""
    from bench.fixture import build_model
    from qlora.adapters import attach_lora
    from qlora.config import LoraSection, ModelSection, QuantizationSection
    from qlora.model.base import load_base

    if not (folder / "config.json").is_file():
        build_model(folder)
    source, quantization = ModelSection(name_or_path=str(folder)), QuantizationSection(compute_dtype="float32")
    base = load_base(source, quantization, gradient_checkpointing=mode)
    return attach_lora(base, LoraSection(r=16, alpha=32, dropout=0.05), seed=0).train()


def probe_batch():
    """(ids, positions): the ROWS as one padding-free micro-batch of fixed random ids."""
    import torch

    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 250, (1, sum(ROWS)), generator=generator)
    positions = torch.cat([torch.arange(length) for length in ROWS])[None]
    return ids, positions


if __name__ == "__main__":
    sys.exit(main())
