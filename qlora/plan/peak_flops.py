"""The device's peak matmul rate, measured once and cached: MFU's denominator.

A data-sheet number is a promise, not what this device does with this torch build (a shared
CPU, a power-capped card), so the loop divides by what a few large matmuls really reach here.
The result is cached per device name + torch version under the user's cache dir (never inside
the package), so only the first run on a machine pays the second or two it takes.

Other work on a CPU can only make the measurement LOW (and MFU read high). So a CPU measurement
records the load it was taken under; one taken on an oversubscribed machine (load average above
the core count) is taken again at the next run that finds the machine quiet, and the cache keeps
the higher of the two rates.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

from qlora.user_cache import cache_dir, write_json_atomically

CACHE_FILE = "peak_matmul_flops.json"


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = next((line.split(":", 1)[1].strip() for line in cpu_info() if line.startswith("model name")), "cpu")
    return f"{model}, {torch.get_num_threads()} threads"


def cpu_info() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def peak_matmul_flops(device, dtype: str) -> dict:
    """{"device", "torch", "dtype", "flops_per_s", "size"}: the best rate of square matmuls in
    `dtype` on `device`, from the cache when this device and torch version were measured."""
    import torch

    name = device_name(device)
    key = f"{name} | torch {torch.__version__} | {dtype}"
    path = cache_dir() / CACHE_FILE
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    entry = cached.get(key)
    now = cpu_load() if device.type == "cpu" else None
    if entry is None or (oversubscribed(entry.get("load_per_cpu")) and not oversubscribed(now)):
        fresh = {**measure(device, getattr(torch, dtype)), **({"load_per_cpu": now} if device.type == "cpu" else {})}
        cached[key] = (
            fresh if entry is None or fresh["flops_per_s"] >= entry["flops_per_s"] else {**entry, "load_per_cpu": now}
        )
        write_json_atomically(path, cached)
    return {"device": name, "torch": torch.__version__, "dtype": dtype, **cached[key]}


def cpu_load() -> Optional[float]:
    """The 1-minute load average per CPU core (None where the OS has none)."""
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:
        return None


def oversubscribed(load_per_cpu: Optional[float]) -> bool:
    """More runnable tasks than cores: a matmul measured now comes out low."""
    return load_per_cpu is not None and load_per_cpu > 1.0


def measure(device, dtype, seconds: float = 0.5) -> dict:
    """Best of repeated n x n matmuls (n: 8192 on CUDA, 1024 on CPU), for about `seconds` after a warmup."""
    import torch

    size = 8192 if device.type == "cuda" else 1024
    # Its own generator: measuring (first run) or not (cached) must not move the global RNG,
    # or a run's dropout masks would depend on the cache.
    generator = torch.Generator(device).manual_seed(0)
    a = torch.randn(size, size, device=device, generator=generator).to(dtype)
    b = torch.randn(size, size, device=device, generator=generator).to(dtype)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.matmul(a, b)
    synchronize()
    best, spent = 0.0, 0.0
    while spent < seconds or best == 0.0:
        start = time.perf_counter()
        for _ in range(4):
            torch.matmul(a, b)
        synchronize()
        elapsed = time.perf_counter() - start
        spent += elapsed
        best = max(best, 4 * 2 * size**3 / elapsed)
    return {"flops_per_s": best, "size": size}
