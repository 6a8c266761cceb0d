"""GPU specs as data (configs/hardware/gpus.yaml): `qlora plan --gpu NAME`'s memory and peak rate."""

from __future__ import annotations

from dataclasses import dataclass

import yaml

from qlora.errors import ConfigError
from qlora.plan.architecture import CONFIGS_DIR

GPUS_FILE = CONFIGS_DIR / "hardware" / "gpus.yaml"


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_bytes: int
    bf16_tflops: float


def load_gpus() -> dict[str, Gpu]:
    raw = yaml.safe_load(GPUS_FILE.read_text()) if GPUS_FILE.is_file() else {}
    return {name: Gpu(name, int(spec["memory_mib"]) * 2**20, float(spec["bf16_tflops"])) for name, spec in raw.items()}


def find_gpu(name: str) -> Gpu:
    raw = yaml.safe_load(GPUS_FILE.read_text()) if GPUS_FILE.is_file() else {}
    gpus = load_gpus()
    wanted = name.lower().removeprefix("nvidia-").removeprefix("rtx-")
    for gpu_name, spec in raw.items():
        names = [gpu_name.lower(), gpu_name.lower().removeprefix("rtx-")] + [
            str(alias).lower() for alias in spec.get("aliases") or []
        ]
        if wanted in names or name.lower() in names:
            return gpus[gpu_name]
    raise ConfigError(f"--gpu {name}: unknown GPU (known: {', '.join(raw)}; or give --gpu-memory, e.g. 24GiB)")
