"""Where flash_attention_2 is used (qlora.model.row_attention.choose_attention): only on CUDA, in
bf16/fp16, with a usable flash-attn, and never for packed sequences at more than one per batch,
which transformers' flash path would let attend to each other. The table, the layouts our
batches really have, the transformers rule the table follows, and the CPU fallback's numbers.
flash itself never runs here (no CUDA): its numbers are the GPU proof's.
"""

import pytest
import torch

from qlora import data
from qlora.model.row_attention import (
    FLASH_ATTENTION,
    ROW_ATTENTION,
    BatchLayout,
    batch_layout,
    choose_attention,
    chosen_attention,
    flash_attention_usable,
    row_bounds,
    use_row_attention,
)
from tests.tiny_training import build_model, tokenized

ONE_SEQUENCE = BatchLayout(rows=1, packed=True)  # padding-free (or packed at micro-batch 1)
PACKED_ROWS = BatchLayout(rows=4, packed=True)  # data.packing without padding_free, micro-batch 4
PADDED_ROWS = BatchLayout(rows=4, packed=False)  # padded rows with an attention mask


@pytest.mark.parametrize(
    "device, dtype, flash, layout, expected, reason",
    [
        ("cpu", "bfloat16", True, ONE_SEQUENCE, ROW_ATTENTION, "CUDA only"),
        ("mps", "float16", True, PADDED_ROWS, ROW_ATTENTION, "CUDA only"),
        ("cuda", "bfloat16", False, ONE_SEQUENCE, ROW_ATTENTION, "not installed"),
        ("cuda", "float32", True, ONE_SEQUENCE, ROW_ATTENTION, "not float32"),
        ("cuda", "float32", True, PADDED_ROWS, ROW_ATTENTION, "not float32"),
        ("cuda", "bfloat16", True, PACKED_ROWS, ROW_ATTENTION, "batch size 1 only, not 4"),
        ("cuda", "float16", True, BatchLayout(rows=2, packed=True), ROW_ATTENTION, "batch size 1 only, not 2"),
        ("cuda", "bfloat16", True, ONE_SEQUENCE, FLASH_ATTENTION, "one flattened sequence"),
        ("cuda", "float16", True, ONE_SEQUENCE, FLASH_ATTENTION, "one flattened sequence"),
        ("cuda", "bfloat16", True, PADDED_ROWS, FLASH_ATTENTION, "attention mask"),
        ("cuda", "bfloat16", True, BatchLayout(), FLASH_ATTENTION, "attention mask"),
    ],
)
def test_flash_only_where_it_keeps_rows_apart(device, dtype, flash, layout, expected, reason):
    choice = choose_attention(device, dtype, flash, layout)
    assert choice.implementation == expected and reason in choice.reason


@pytest.mark.parametrize(
    "micro_batch, packing, padding_free",
    [(3, False, True), (3, True, True), (1, True, False), (3, True, False), (3, False, False)],
)
def test_the_layout_is_the_one_the_batches_have(tiny_model_dir, tmp_path, micro_batch, packing, padding_free):
    tokenizer, examples = tokenized(tiny_model_dir, tmp_path, rows=12)
    batches = data.epoch_batches(
        examples, micro_batch, packing, 128, tokenizer.pad_token_id, 0, 0, shuffle=False, padding_free=padding_free
    )
    layout = batch_layout(micro_batch, packing, padding_free)
    assert {batch.input_ids.shape[0] for batch in batches[:-1]} == {layout.rows}
    assert all((batch.attention_mask is None) == layout.packed for batch in batches)


def test_transformers_detects_packed_rows_from_position_ids_at_batch_size_one_only():
    """The rule choose_attention follows, on the installed transformers (its flash path's own check)."""
    from transformers.modeling_flash_attention_utils import _is_packed_sequence

    positions = torch.tensor([list(range(5)) + list(range(3))])
    assert bool(_is_packed_sequence(positions, batch_size=1))
    assert not bool(_is_packed_sequence(positions.expand(2, -1), batch_size=2))  # packed, yet not detected


def test_on_cpu_the_model_keeps_per_row_attention_whatever_the_dtype(tiny_model_dir):
    model = build_model(tiny_model_dir)
    assert not flash_attention_usable()  # no CUDA, no flash-attn here: transformers' check says no, nothing imported
    for dtype in ("bfloat16", "float16", "float32"):
        choice = use_row_attention(model, dtype, ONE_SEQUENCE)
        assert choice.implementation == ROW_ATTENTION and "CUDA only" in choice.reason
        assert model.config._attn_implementation == ROW_ATTENTION
        assert chosen_attention(model) == choice  # what the job's "attention:" line reports


def test_the_fallback_keeps_packed_rows_apart_at_several_sequences_per_batch(tiny_model_dir, tmp_path):
    """Packing without padding-free at micro-batch 2, where flash would mix rows: ours gives each
    row its logits alone."""
    tokenizer, examples = tokenized(tiny_model_dir, tmp_path, rows=8)
    batch = data.epoch_batches(examples, 2, True, 128, tokenizer.pad_token_id, 0, 0, shuffle=False)[0]
    assert batch.input_ids.shape[0] == 2 and batch.attention_mask is None
    model = build_model(tiny_model_dir).eval()
    assert model.config._attn_implementation == ROW_ATTENTION  # what load_base set on CPU
    pending = list(batch.row_ids)
    compared = [0, 0]
    with torch.no_grad():
        together = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
        for sequence in range(2):
            segments = row_bounds(batch.position_ids[sequence])
            for index, (start, end) in enumerate(segments):
                row = torch.tensor([examples[pending[0]].input_ids]) if pending else None
                if row is None or not torch.equal(batch.input_ids[sequence : sequence + 1, start:end], row):
                    assert index == len(segments) - 1  # only the padding tail is not a row
                    continue
                pending.pop(0)
                alone = model(input_ids=row, use_cache=False).logits
                torch.testing.assert_close(together[sequence : sequence + 1, start:end], alone, rtol=1e-5, atol=1e-5)
                compared[sequence] += 1
    assert min(compared) >= 2 and not pending  # several rows in each sequence, every row compared


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_in_bf16_flash_keeps_the_rows_of_a_padding_free_batch_apart(tiny_model_dir, tmp_path):
    """What only a GPU shows: where flash-attn is usable load_base picks it, and a padding-free
    sequence of rows gives each row its logits alone (bf16 rounding apart)."""
    if not flash_attention_usable():
        pytest.skip("flash-attn 2 is not installed (or does not import with this torch)")
    tokenizer, examples = tokenized(tiny_model_dir, tmp_path, rows=3)
    pad_id = tokenizer.pad_token_id
    batch = data.epoch_batches(examples, 3, False, 64, pad_id, 0, 0, shuffle=False, padding_free=True)[0]
    model = build_model(tiny_model_dir, compute_dtype="bfloat16").eval()
    assert model.config._attn_implementation == FLASH_ATTENTION
    device = next(model.parameters()).device
    with torch.no_grad():
        together = model(
            input_ids=batch.input_ids.to(device), position_ids=batch.position_ids.to(device), use_cache=False
        ).logits.float()
        start = 0
        for row_id in batch.row_ids:
            row = torch.tensor([examples[row_id].input_ids], device=device)
            alone = model(input_ids=row, use_cache=False).logits.float()
            end = start + row.shape[1]
            torch.testing.assert_close(together[:, start:end], alone, rtol=0, atol=3e-2)
            start = end
