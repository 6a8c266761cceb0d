"""LoRA input dropout with a cheaper random mask on CPU.

peft's nn.Dropout draws one 32-bit random number per element (bernoulli_): on the bench fixture
that was 18% of a CPU training step (torch.profiler, bench/compare.py's model). Here one 64-bit
draw gives four 16-bit uniforms, so the mask costs a quarter of the draws; p is rounded to a
multiple of 1/65536 (0.05 -> 0.0500031) and the kept values are scaled by 1 / (1 - that p), so
the output's expectation is exactly the input. Same generator as torch's dropout, so seeding
and gradient checkpointing's RNG replay (the recomputed forward sees the same mask) still hold.
On other devices the fused nn.Dropout kernel is already cheap and is used unchanged.
"""

from __future__ import annotations

import torch

LEVELS = 1 << 16


class CheapMaskDropout(torch.nn.Dropout):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        keep, keep_scale = keep_mask(x, self.p)
        return x * (keep * keep_scale).to(x.dtype)


def keep_mask(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """A bool mask of x's shape keeping each element with probability 1 - p, and the scale that
    keeps the expectation (the cheap draw on CPU, torch's uniform elsewhere)."""
    if x.device.type != "cpu":
        return torch.rand(x.shape, device=x.device) >= p, 1 / (1 - p)
    dropped_levels = round(p * LEVELS)
    count = x.numel()
    # Four int16 uniforms per int64 draw; a kept element is one whose uniform is not among the
    # lowest dropped_levels.
    bits = torch.randint(-(1 << 63), (1 << 63) - 1, ((count + 3) // 4,), dtype=torch.int64, device=x.device)
    uniform = bits.view(torch.int16)[:count].view(x.shape)
    return uniform >= -(LEVELS // 2) + dropped_levels, LEVELS / (LEVELS - dropped_levels)


def use_cheap_mask_dropout(peft_model) -> int:
    """Swap every LoRA nn.Dropout for CheapMaskDropout (same p); returns how many were swapped."""
    swapped = 0
    for module in peft_model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for name, dropout in list(dropouts.items()):
            if type(dropout) is torch.nn.Dropout:
                dropouts[name] = CheapMaskDropout(dropout.p)
                swapped += 1
    return swapped
