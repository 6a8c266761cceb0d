"""Attention that never crosses a row boundary, for padding-free and packed micro-batches.

A padding-free micro-batch is ONE sequence of rows end to end, each row's position ids
restarting at 0. transformers' SDPA path keeps rows apart with a block-diagonal mask over the
whole sequence, so it computes (sum of row lengths)^2 scores and throws most away, and a masked
SDPA cannot use the causal fast path. Here each row runs its own causal SDPA: sum of squares.

Registered with transformers' AttentionInterface under ROW_ATTENTION (a named extension point,
no patching). Anything else (padding masks, several sequences in a batch, a KV cache when
generating) goes to transformers' own SDPA unchanged, so one implementation serves training,
eval and generation. On CUDA with flash-attn installed, flash_attention_2 does the same split
natively (varlen kernels from position ids) and is used instead.
"""

from __future__ import annotations

ROW_ATTENTION = "qlora_rows"


def use_row_attention(model) -> str:
    """Switch a transformers model to per-row attention (flash_attention_2 on CUDA when
    installed); returns the implementation set."""
    import importlib.util

    import torch

    on_cuda = torch.cuda.is_available() and next(model.parameters()).is_cuda
    if on_cuda and importlib.util.find_spec("flash_attn") is not None:  # CUDA only: not run on the CPU test machine
        implementation = "flash_attention_2"
    else:
        register()
        implementation = ROW_ATTENTION
    model.set_attn_implementation(implementation)
    return implementation


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ROW_ATTENTION, row_attention_forward)
    AttentionMaskInterface.register(ROW_ATTENTION, row_attention_mask)


def row_attention_mask(batch_size: int, q_length: int, kv_length: int, attention_mask=None, **kwargs):
    """No mask for one sequence without padding or cache (rows come from position ids); else SDPA's."""
    from transformers.masking_utils import sdpa_mask

    if batch_size == 1 and attention_mask is None and q_length == kv_length and kwargs.get("q_offset", 0) == 0:
        return None
    return sdpa_mask(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, attention_mask=attention_mask, **kwargs
    )


def row_attention_forward(module, query, key, value, attention_mask, position_ids=None, **kwargs):
    """query/key/value [1, heads, T, head_dim] -> ([1, T, heads, head_dim], None), causal within each row."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    length = query.shape[2]
    if attention_mask is not None or position_ids is None or query.shape[0] != 1 or key.shape[2] != length:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    bounds = row_bounds(position_ids.reshape(-1)[-length:])
    if len(bounds) == 1:
        return sdpa_attention_forward(module, query, key, value, None, **kwargs)
    outputs = [
        sdpa_attention_forward(
            module, query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], None, **kwargs
        )[0]
        for start, end in bounds
    ]
    return torch.cat(outputs, dim=1), None


def row_bounds(position_ids) -> list[tuple[int, int]]:
    """[(start, end)] of each row of a sequence whose position ids restart at 0 at every row.
    (A host read of the row starts: free on CPU, one small sync per layer on CUDA.)"""
    starts = (position_ids == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts
    ends = starts[1:] + [int(position_ids.shape[0])]
    return list(zip(starts, ends))
