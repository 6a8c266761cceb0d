"""Which activations the backward pass recomputes: gradient checkpointing, full or selective.

Full checkpointing keeps each decoder layer's input and recomputes the whole layer in backward:
every frozen 4-bit matmul then runs three times per step (forward, recompute, input gradient).
Selective checkpointing keeps the OUTPUTS of those matmuls from the forward pass, so the
recompute skips them and redoes only what is cheap per byte kept: norms, rotary, attention,
the MLP activation and the LoRA branch (its dropout masks are redrawn from the saved RNG state,
as under full checkpointing). The result is bit-identical; the price is memory: per token and
layer, the summed output widths of the quantized linears (for Llama: q + k + v + o + 2 x MLP
intermediate + hidden values) instead of nothing beyond the layer input. `qlora plan` counts it.

Mechanism: torch's selective activation checkpointing (`create_selective_checkpoint_contexts`)
with a policy that names bitsandbytes' fused 4-bit matmul op, the one op every `Linear4bit`
forward dispatches in training (bitsandbytes 0.50 `MatMul4Bit`). No module names, so it holds
for any architecture; 8-bit and 16-bit bases never dispatch it, hence the config's rule that
`selective` needs `quantization.bits: 4`.
"""

from __future__ import annotations

import functools
from typing import Optional, Union

SELECTIVE = "selective"


def checkpoint_kwargs(mode: Union[bool, str]) -> Optional[dict]:
    """Keyword arguments for torch.utils.checkpoint (through transformers), or None when off."""
    if not mode:
        return None
    if mode not in (True, SELECTIVE):  # "auto" is the job's to resolve (qlora.plan.checkpointing_mode) before loading
        raise ValueError(f"gradient checkpointing mode {mode!r}: expected True, False or {SELECTIVE!r}")
    kwargs = {"use_reentrant": False}  # non-reentrant: the frozen base needs no grad-requiring inputs per block
    if mode == SELECTIVE:
        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, keep_frozen_4bit_matmuls())
    return kwargs


def keep_frozen_4bit_matmuls():
    """SAC policy: save what the 4-bit matmuls return, recompute everything else.

    It runs for every op of the forward and the recompute, so it compares one object and
    returns. On a base without 4-bit layers it keeps nothing: full checkpointing."""
    import importlib

    import torch
    from torch.utils.checkpoint import CheckpointPolicy

    importlib.import_module("bitsandbytes")  # registers torch.ops.bitsandbytes
    matmul_4bit = torch.ops.bitsandbytes.gemm_4bit.default
    keep, recompute = CheckpointPolicy.MUST_SAVE, CheckpointPolicy.PREFER_RECOMPUTE

    def policy(ctx, op, *args, **kwargs):
        return keep if op is matmul_4bit else recompute

    return policy
