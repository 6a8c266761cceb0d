"""Where numbers go: metrics.jsonl, the progress bar, memory and byte formatting."""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from pathlib import Path
from typing import Optional


class MetricsLog:
    """Appends one JSON object per line and flushes it, so a killed run keeps every step it logged."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.file = open(self.path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        self.file.write(json.dumps({key: clean(value) for key, value in row.items()}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def clean(value):
    """JSON has no NaN/inf: write them as null rather than producing an unreadable line."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


def progress_bar(total: int, description: str, initial: int = 0):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=description, unit="step", dynamic_ncols=True, file=sys.stderr)


def reset_peak_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> tuple[str, int]:
    """(kind, bytes): peak allocated GPU memory on CUDA, else the process's peak resident set."""
    import torch

    if torch.cuda.is_available():
        return "gpu_allocated", torch.cuda.max_memory_allocated()
    return "process_rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def format_bytes(count: Optional[float]) -> str:
    if count is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def file_size(path: os.PathLike) -> int:
    return os.stat(path).st_size
