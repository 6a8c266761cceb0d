"""Mixed precision, explicit: the loop runs forward and loss under `precision.autocast()` and
steps through `precision.scaler` (nanoGPT's `ctx` and `scaler`), so nothing about dtypes is
hidden in a wrapper and the chunked loss (qlora.training.loss) computes its head chunks under
the same autocast as the forward, by construction."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class Precision:
    """How the loop computes: an autocast dtype for the forward and the loss (None: the model's
    own dtypes) and the loss scaler float16 needs (disabled otherwise: its calls pass through)."""

    device_type: str
    autocast_dtype: Optional[torch.dtype]
    scaler: torch.amp.GradScaler

    @classmethod
    def none(cls, device_type: str = "cpu") -> "Precision":
        """The model's own dtypes, no scaling: what a loop given no precision runs with."""
        return cls(device_type, None, torch.amp.GradScaler(device_type, enabled=False))

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)


def build_precision(compute_dtype: str, device_type: str) -> Precision:
    """Autocast in compute_dtype on a GPU (bitsandbytes already computes the 4-bit layers in it;
    autocast covers the LoRA matmuls, the head and the rest). On CPU no autocast: on top of
    bitsandbytes it only slowed steps down (demo model, compute bfloat16, 20 steps: 31 s without
    autocast, 40 s with). A GradScaler only for float16, whose gradients underflow unscaled."""
    on_gpu = device_type == "cuda"
    autocast_dtype = getattr(torch, compute_dtype) if on_gpu and compute_dtype in ("bfloat16", "float16") else None
    scaler = torch.amp.GradScaler(device_type, enabled=autocast_dtype == torch.float16)
    return Precision(device_type=device_type, autocast_dtype=autocast_dtype, scaler=scaler)
