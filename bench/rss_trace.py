"""Where a run's resident memory goes: compare.py's `ours` run in this process, with /proc/self
VmRSS sampled every 10 ms and glibc's heap statistics read at each phase boundary.

    python bench/rss_trace.py                         # compare.py's settings and ours@tied, 30 steps
    python bench/rss_trace.py --steps 10 --fresh-cache
    python bench/rss_trace.py --run ours-full-checkpointing

Prints one line per phase (RSS at its end, the highest RSS inside it, the process peak so far,
glibc heap bytes in use / free-but-kept / mmapped) and a final JSON line. Linux only (/proc).
The phases are marked by wrapping run_job's steps in this process only: a measuring tool, the
library is unchanged by it.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MIB = 1024 * 1024


def status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def heap() -> dict:
    """glibc's view over all arenas: bytes handed out, free bytes still held, bytes in mmapped chunks."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = Mallinfo2
        info = libc.mallinfo2()
    except (OSError, AttributeError):
        return {}
    return {"in_use": info.uordblks, "free_kept": info.fordblks, "mmapped": info.hblkhd}


class Sampler(threading.Thread):
    """VmRSS every `interval` s; phase() closes a phase and returns its highest sample."""

    def __init__(self, interval: float = 0.01):
        super().__init__(daemon=True)
        self.interval, self.high, self.running = interval, 0, True
        self.started = time.perf_counter()
        self.rows = []

    def run(self) -> None:
        while self.running:
            self.high = max(self.high, status_kib("VmRSS"))
            time.sleep(self.interval)

    def phase(self, name: str) -> None:
        rss = status_kib("VmRSS")
        row = {
            "phase": name,
            "t_s": round(time.perf_counter() - self.started, 2),
            "rss_mib": round(rss / 1024),
            "high_in_phase_mib": round(max(self.high, rss) / 1024),
            "hwm_mib": round(status_kib("VmHWM") / 1024),
            "anon_mib": round(status_kib("RssAnon") / 1024),
            "file_mib": round(status_kib("RssFile") / 1024),
            "user_s": round(resource.getrusage(resource.RUSAGE_SELF).ru_utime, 1),
            "sys_s": round(resource.getrusage(resource.RUSAGE_SELF).ru_stime, 1),
            **{key + "_mib": round(value / MIB) for key, value in heap().items()},
        }
        self.rows.append(row)
        self.high = 0
        print("  ".join(f"{key}={value}" for key, value in row.items()), file=sys.stderr, flush=True)


def wrap(module, name: str, sampler: Sampler, label: str) -> None:
    original = getattr(module, name)

    def wrapped(*args, **kwargs):
        result = original(*args, **kwargs)
        sampler.phase(label)
        return result

    setattr(module, name, wrapped)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--run", default="ours", help="one of compare.py's ours runs (bench/compare_runs.OURS_RUNS)")
    parser.add_argument(
        "--fresh-cache",
        action="store_true",
        help="an empty QLORA_CACHE_DIR: tokenizer-cache miss and a peak-FLOPs measurement",
    )
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "qlora-bench-compare"))
    args = parser.parse_args(argv)
    if args.fresh_cache:
        os.environ["QLORA_CACHE_DIR"] = tempfile.mkdtemp(prefix="qlora-cache-")
    sampler = Sampler()
    sampler.start()
    sampler.phase("python started")
    import torch

    from bench import compare, compare_runs
    from qlora.job import artifacts, placement
    from qlora.job import run as job
    from qlora.training import metrics

    sampler.phase(f"imports (torch {torch.__version__})")
    bench_args = compare.parse_args(["--steps", str(args.steps), "--work", args.work, "--runs", "ours@tied"])
    settings = compare.settings_of(bench_args)
    fixture = compare.fixture_of(bench_args, "tied")
    wrap(job, "prepare_data", sampler, "data read + tokenized")
    wrap(placement, "load_base", sampler, "base loaded (4-bit)")
    wrap(placement, "attach_lora", sampler, "LoRA attached")
    wrap(job, "job_flop_meter", sampler, "peak-FLOPs rate (probe on a miss)")
    wrap(artifacts, "write_artifacts", sampler, "adapter written")
    log_write = metrics.MetricsLog.write

    def step_written(self, row):
        log_write(self, row)
        if "loss" in row:
            sampler.phase(f"step {row['step']}")

    metrics.MetricsLog.write = step_written
    adapter_dir = Path(args.work) / "runs" / "rss-trace"
    shutil.rmtree(adapter_dir, ignore_errors=True)
    record = compare_runs.run_ours(settings, fixture, compare_runs.OURS_RUNS[args.run], adapter_dir)
    scores = compare_runs.evaluate_adapters(settings, fixture, settings["compute_dtype"], [adapter_dir])
    record["eval_loss"] = scores[str(adapter_dir)]["eval_loss"]
    sampler.phase("eval (second base + adapter)")
    sampler.running = False
    print(
        json.dumps(
            {
                "peak_rss_mib": round(record["peak_memory_bytes"] / MIB),
                "final_train_loss": record["final_train_loss"],
                "eval_loss": record["eval_loss"],
                "cache": os.environ.get("QLORA_CACHE_DIR", "default"),
                "phases": sampler.rows,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
