"""Jobs for real multi-process runs (torchrun, `qlora train --nproc`, accelerate launch) on the
tiny model: the job file, its data, the environment a child process needs, its metrics."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import yaml

from tests.tiny import chat_row

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6


def write_uneven_data(path: Path, count: int, seed: int) -> Path:
    """Answers of 2 or 24 letters at random: the two ranks' micro-batches of a step hold very
    different numbers of supervised tokens."""
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for _ in range(count):
            word = "".join(rng.choice("abcdefghij") for _ in range(rng.choice((2, 24))))
            handle.write(json.dumps(chat_row(f"reverse {word}", word[::-1])) + "\n")
    return path


def make_job(directory: Path, model_dir: Path, rows: int = 32, **train) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    write_uneven_data(directory / "train.jsonl", rows, seed=3)
    write_uneven_data(directory / "eval.jsonl", 10, seed=4)  # 5 eval batches: uneven over 2 ranks
    job = {
        "model": {"name_or_path": str(model_dir)},
        "quantization": {"bits": 4, "compute_dtype": "float32"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": "train.jsonl", "eval": "eval.jsonl", "max_seq_len": 64},
        "train": {
            "max_steps": STEPS,
            "micro_batch_size": 2,
            "learning_rate": 1e-2,
            "optimizer": "adamw",
            "seed": 0,
            "eval_every": 3,
            **train,
        },
        "output": {"dir": "out"},
    }
    path = directory / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def environment(**extra) -> dict:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        **{key: str(value) for key, value in extra.items()},
    }


def metrics(output: Path) -> list[dict]:
    path = output / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")] if path.exists() else []
