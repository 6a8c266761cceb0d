"""Where numbers go: metrics.jsonl (and the experiment trackers it feeds), the progress bar, peak memory."""

from __future__ import annotations

import json
import math
import resource
import sys
import time
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
    """tqdm's bar on a terminal; elsewhere (docker logs, a pod log, a Slurm .out file, the
    service's job log) plain lines, where a carriage-return bar would become one endless line."""
    if not sys.stderr.isatty():
        return PlainProgress(total, description, initial, disable)
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


class PlainProgress:
    """The part of tqdm's interface the loop and the CLI use, printing one line per update that
    follows a set_postfix (the loop calls it every train.log_every steps) and one at the end."""

    def __init__(self, total: int, description: str, initial: int = 0, disable: bool = False):
        self.total, self.description, self.n, self.disable = total, description, initial, disable
        self.started_at, self.started, self.postfix = initial, time.monotonic(), None

    def set_postfix(self, refresh: bool = True, **values) -> None:
        self.postfix = values

    def update(self, count: int = 1) -> None:
        self.n += count
        if self.disable or (self.postfix is None and self.n < self.total):
            return
        parts = [f"{self.description}: {self.n}/{self.total}"]
        parts += [f"{key} {value}" for key, value in (self.postfix or {}).items()]
        elapsed = time.monotonic() - self.started
        if self.n < self.total and self.n > self.started_at:
            remaining = elapsed / (self.n - self.started_at) * (self.total - self.n)
            parts.append(f"eta {format_seconds(remaining)}")
        else:
            parts.append(f"elapsed {format_seconds(elapsed)}")
        print(", ".join(parts), file=sys.stderr, flush=True)
        self.postfix = None

    def close(self) -> None:
        pass

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def format_seconds(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"


def reset_peak_memory() -> None:
    """Start the GPU's peak counters over, from an emptied cache: without empty_cache the reserved
    peak would start from the blocks loading and the peak-FLOPs probe left cached."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> tuple[str, int]:
    """(kind, bytes): peak allocated GPU memory on CUDA, else the process's peak resident set."""
    import torch

    if torch.cuda.is_available():
        return "gpu_allocated", torch.cuda.max_memory_allocated()
    return "process_rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
