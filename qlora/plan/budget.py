"""The memory an auto setting plans for: train.memory_budget, else the CUDA card's total memory,
else (CPU) the RAM available now, shared by the processes of this host under torchrun."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Union

from qlora.sizes import parse_bytes


@dataclass(frozen=True)
class MemoryBudget:
    bytes: int
    source: str  # where the number came from, as the choice's line names it


def read_budget(setting: Optional[Union[int, str]]) -> Optional[MemoryBudget]:
    """The memory auto plans for (train.memory_budget, the CUDA card, or the available RAM);
    None when none is known. Never raises: under torchrun every rank must reach the gather of
    these readings, so a missing one is decided after it."""
    if setting is not None:
        return MemoryBudget(parse_bytes(str(setting)), f"train.memory_budget {setting}")
    import torch

    if torch.cuda.is_available():
        device = torch.cuda.get_device_properties(torch.cuda.current_device())
        return MemoryBudget(device.total_memory, f"the {device.name}'s total memory")
    available = available_ram()
    if available is None:
        return None
    # The ranks of one host draw on the same RAM (torchrun sets LOCAL_WORLD_SIZE).
    sharing = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    source = "available RAM" + (f" / {sharing} processes on this host" if sharing > 1 else "")
    return MemoryBudget(available // sharing, source)


def available_ram() -> Optional[int]:
    """RAM a new allocation can take without swapping: psutil if installed (any OS), else Linux's
    MemAvailable (free + reclaimable caches, the kernel's own estimate)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as meminfo:
            for row in meminfo:
                if row.startswith("MemAvailable:"):
                    return int(row.split()[1]) * 1024
    except OSError:
        pass
    return None
