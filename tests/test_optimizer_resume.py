"""A resumed paged 8-bit AdamW holds the state its uninterrupted run held: the same tensors, and
its moments re-allocated by bitsandbytes' own get_state_buffer (paged where bitsandbytes pages).

bitsandbytes' load_state_dict alone leaves ordinary tensors; on CUDA those would sit in torch's
allocator instead of unified memory. On CPU bitsandbytes never pages (get_state_buffer returns
torch.zeros_like), so here the test sees the re-allocation and the values, not the paging: that
the re-allocated moments are paged on CUDA only a GPU run shows.
"""

import torch

from qlora import data
from qlora.adapters import attach_lora
from qlora.config import LoraSection
from qlora.model.base import load_tokenizer
from qlora.training.builders import build_optimizer, build_schedule, loop_settings
from qlora.training.checkpoint import (
    STATE_BUFFER_KEYS,
    load_optimizer_state,
    load_training_state,
    save_training_state,
)
from qlora.training.loop import train
from tests.tiny import write_chat_data
from tests.tiny_training import settings, tiny_base

# hidden 256, r=16: most LoRA matrices reach bitsandbytes' min_8bit_size (4096 elements), so their
# moments are uint8 with absmax blocks (all of the hidden-64 model's stay float32).
LORA = LoraSection(r=16, alpha=32, dropout=0.0)
SECTION = settings(max_steps=2, save_every=2, optimizer="paged_adamw_8bit", learning_rate=1e-3)


def lora_model(model_dir):
    return attach_lora(tiny_base(model_dir), LORA, seed=0)


def trained_optimizer(model_dir, tmp_path):
    """A paged_adamw_8bit optimizer after two real steps, and the state its checkpoint holds on disk."""
    tokenizer = load_tokenizer(str(model_dir))
    rows = data.read_rows([(str(write_chat_data(tmp_path / "rows.jsonl", 16, seed=1)), "auto")])
    examples = data.tokenize_rows(rows, tokenizer, 64, "completions", "truncate").examples
    model = lora_model(model_dir)
    optimizer = build_optimizer(model, SECTION)
    saved = []
    train(
        model,
        optimizer,
        build_schedule(optimizer, SECTION, SECTION.max_steps),
        loop_settings(SECTION, SECTION.max_steps),
        lambda epoch: data.epoch_batches(examples, 4, False, 64, tokenizer.pad_token_id, seed=0, epoch=epoch),
        save_checkpoint=lambda state: saved.append(state) or tmp_path,
    )
    save_training_state(tmp_path, saved[-1], run={})
    state, _ = load_training_state(tmp_path)
    return optimizer, state.optimizer


def by_index(optimizer) -> list[dict]:
    return [optimizer.state[parameter] for group in optimizer.param_groups for parameter in group["params"]]


def test_a_loaded_paged_8bit_state_equals_the_trained_one_with_its_moments_reallocated(tiny256, tmp_path):
    trained, saved_state = trained_optimizer(tiny256, tmp_path)
    resumed = build_optimizer(lora_model(tiny256), SECTION)
    rebuilt = load_optimizer_state(resumed, saved_state)

    assert resumed.is_paged and trained.is_paged
    before, after = by_index(trained), by_index(resumed)
    assert len(before) == len(after) > 0
    # Every moment went through get_state_buffer; nothing else did (absmax, qmap stay as loaded).
    assert {(buffer.parameter, buffer.key) for buffer in rebuilt} == {
        (index, key) for index, state in enumerate(before) for key in STATE_BUFFER_KEYS if key in state
    }
    # Both of bitsandbytes' paths: 8-bit moments with absmax blocks, and float32 ones for the small
    # k/v B matrices (128 x 16 < min_8bit_size).
    assert {state["state1"].dtype for state in before} == {torch.uint8, torch.float32}
    for index, (expected, got) in enumerate(zip(before, after)):
        assert expected.keys() == got.keys()
        for key, value in expected.items():
            if isinstance(value, torch.Tensor):
                assert (got[key].dtype, got[key].shape, got[key].device) == (value.dtype, value.shape, value.device)
                assert torch.equal(got[key], value), (index, key)
            else:
                assert got[key] == value, (index, key)
    # Paged as the uninterrupted run's buffers were: on CPU neither is (bitsandbytes cannot page
    # there), on CUDA both are for the tensors bitsandbytes pages.
    for buffer in rebuilt:
        original = before[buffer.parameter][buffer.key]
        assert buffer.paged == bool(getattr(original, "is_paged", False))
        assert buffer.paged == bool(getattr(after[buffer.parameter][buffer.key], "is_paged", False))


def test_a_non_paged_optimizer_loads_as_torch_does(tiny_model_dir):
    model = lora_model(tiny_model_dir)
    optimizer = build_optimizer(model, settings(optimizer="adamw"))
    assert load_optimizer_state(optimizer, optimizer.state_dict()) == []
