"""Where numbers go: metrics.jsonl (and the experiment trackers it feeds), the progress bar, peak memory."""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path


class MetricsLog:
    """Appends one JSON object per line and flushes it, so a killed run keeps every step it logged;
    then hands the row to `trackers` (qlora.training.trackers.Trackers: never raises)."""

    def __init__(self, path: Path, trackers=None):
        self.path = Path(path)
        self.file = open(self.path, "a", encoding="utf-8")
        self.trackers = trackers

    def write(self, row: dict) -> None:
        self.file.write(json.dumps({key: clean(value) for key, value in row.items()}) + "\n")
        self.file.flush()
        if self.trackers:
            self.trackers.log(row)

    def close(self) -> None:
        self.file.close()


def clean(value):
    """JSON has no NaN/inf: write them as null rather than producing an unreadable line."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


def progress_bar(total: int, description: str, initial: int = 0, disable: bool = False):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=description,
        unit="step",
        dynamic_ncols=True,
        file=sys.stderr,
        disable=disable,
    )


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
