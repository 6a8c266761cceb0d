"""Attention that never crosses a row boundary, for padding-free and packed micro-batches.

A padding-free micro-batch is ONE sequence of rows end to end, each row's position ids
restarting at 0. transformers' SDPA path keeps rows apart with a block-diagonal mask over the
whole sequence, so it computes (sum of row lengths)^2 scores and throws most away, and a masked
SDPA cannot use the causal fast path. Here each row runs its own causal SDPA: sum of squares.

Registered with transformers' AttentionInterface under ROW_ATTENTION (a named extension point,
no patching). Anything else (padding masks, several sequences in a batch, a KV cache when
generating) goes to transformers' own SDPA unchanged, so one implementation serves training,
eval and generation. On CUDA flash_attention_2 does the same split natively where it is
correct (choose_attention says where) and is used instead.

What flash_attention_2 does with our batches, read in transformers' source (5.24, tested here, and
5.17, the GPU box's: the same rule, written differently): integrations/flash_attention.py
`flash_attention_forward` -> modeling_flash_attention_utils.py `_flash_attention_forward`, which
keeps rows apart (the varlen kernel) in three cases only: a 2-D attention mask (`_upad_input`
unpads it: padded batches are correct at any batch size), cu_seq_lens/max_length kwargs (we pass
none), or `_is_packed_sequence(position_ids, batch_size)`, False unless batch_size == 1 (its
docstring: "Flattened sequences only are supported"), whose cu_seqlens `_prepare_from_posids` /
`prepare_fa_kwargs_from_position_ids` take from where the position ids restart. Otherwise it runs
the plain causal kernel over each whole row. So a padding-free micro-batch (one flattened row,
position ids restarting at each row: qlora.data.batching) is correct at any micro_batch_size,
while packed sequences without padding-free at micro_batch_size > 1 ([B, T], no mask) would let
packed rows attend to each other: those take our per-row path, whose mask (masking_utils
`_preprocess_mask_arguments` -> `find_packed_sequence_indices`, then `sdpa_mask`) finds packed
rows from position ids at any batch size. flash-attn computes in bf16/fp16 only (`get_target_dtype`
casts a float32 query to the autocast dtype, or the weights' dtype, float32 under compute_dtype
float32, and the kernel raises on it). `is_flash_attn_2_available` (utils/import_utils.py) reads
package metadata and the version only, so the extension is also imported once here: a wheel
built against another torch fails then, not in the first training step.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional

ROW_ATTENTION = "qlora_rows"
FLASH_ATTENTION = "flash_attention_2"
FLASH_DTYPES = ("bfloat16", "float16")


@dataclass(frozen=True)
class AttentionChoice:
    implementation: str
    reason: str


# model -> the choice use_row_attention made for it, for the job's log line: the FSDP base is
# chosen for in host memory, so deciding again where it sits later could tell another story.
_chosen: "weakref.WeakKeyDictionary[object, AttentionChoice]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class BatchLayout:
    """The micro-batches a model will see, as far as the attention choice cares."""

    rows: int = 1
    """Sequences per tensor (its batch dimension): 1 for padding-free batches (all rows end to end
    in one sequence), micro_batch_size otherwise."""
    packed: bool = False
    """Rows inside a sequence kept apart by restarting position ids alone, no attention mask
    (data.packing or data.padding_free); padded batches carry a mask."""


def batch_layout(micro_batch_size: int, packing: bool, padding_free: bool) -> BatchLayout:
    """The layout qlora.data.batching.epoch_batches builds for these settings."""
    return BatchLayout(rows=1 if padding_free else micro_batch_size, packed=packing or padding_free)


def choose_attention(
    device_type: str, compute_dtype: str, flash_available: bool, layout: BatchLayout
) -> AttentionChoice:
    """flash_attention_2 where it is correct for these batches (the module's docstring says what
    transformers does with them), else our per-row attention; the reason names the deciding fact."""
    if device_type != "cuda":
        return AttentionChoice(ROW_ATTENTION, f"flash-attn runs on CUDA only, not {device_type}")
    if not flash_available:
        return AttentionChoice(ROW_ATTENTION, "flash-attn 2 is not installed or does not import with this torch")
    if compute_dtype not in FLASH_DTYPES:
        return AttentionChoice(ROW_ATTENTION, f"flash-attn computes in bfloat16/float16, not {compute_dtype}")
    if layout.packed and layout.rows > 1:
        return AttentionChoice(
            ROW_ATTENTION,
            f"transformers finds packed rows from position ids at batch size 1 only, not {layout.rows} "
            "(data.packing without data.padding_free): flash would let packed rows attend to each other",
        )
    shape = "one flattened sequence, rows from position ids" if layout.packed else "padded rows, attention mask"
    return AttentionChoice(FLASH_ATTENTION, f"CUDA, {compute_dtype}, {shape}")


def flash_attention_usable() -> bool:
    """transformers' own check (package metadata, version, CUDA), then the import its first call
    would do: an extension built against another torch fails to load here."""
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        return False
    try:
        import flash_attn  # noqa: F401  (loads flash_attn_2_cuda, the compiled extension)
    except (ImportError, OSError):
        return False
    return True


def attention_choice(model, compute_dtype: str = "float32", layout: BatchLayout = BatchLayout()) -> AttentionChoice:
    """choose_attention for a model where it sits now (its device, this machine's flash-attn)."""
    device_type = next(model.parameters()).device.type
    flash = device_type == "cuda" and flash_attention_usable()  # CUDA only: not run on the CPU test machine
    return choose_attention(device_type, compute_dtype, flash, layout)


def use_row_attention(model, compute_dtype: str = "float32", layout: BatchLayout = BatchLayout()) -> AttentionChoice:
    """Switch a transformers model to per-row attention, or flash_attention_2 where attention_choice
    finds it correct for `layout`; returns the choice. The defaults (float32; one sequence or padded
    rows) never pick flash for a caller that says nothing."""
    choice = attention_choice(model, compute_dtype, layout)
    if choice.implementation == ROW_ATTENTION:
        register()
    model.set_attn_implementation(choice.implementation)
    _chosen[model] = choice
    return choice


def chosen_attention(model) -> Optional[AttentionChoice]:
    """What use_row_attention set on this model, and why (None if it never ran on it)."""
    return _chosen.get(model)


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
