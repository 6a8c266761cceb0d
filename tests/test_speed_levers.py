"""Speed levers keep the numbers: data.padding_free gives the padded loss and gradients; per-row
attention keeps packed and padding-free rows apart; the cheap-mask LoRA dropout is a dropout
(rate, expectation, replayed by gradient checkpointing); train.offload_activations gives the same
losses and adapter.

Also the bench fixture (bench/compare.py builds it): its model has the stated size.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlora import data
from qlora.adapters.dropout import CheapMaskDropout
from qlora.labels import IGNORE_INDEX
from qlora.model.row_attention import ROW_ATTENTION, row_bounds
from qlora.training.loop import summed_loss
from tests.tiny_training import batches_fn, build_model, run_logged, settings, tiny_base, tokenized

REPO = Path(__file__).resolve().parents[1]


def both_ways(examples, pad_id, micro_batch_size=4):
    padded = data.epoch_batches(examples, micro_batch_size, False, 64, pad_id, seed=3, epoch=0)
    flat = data.epoch_batches(examples, micro_batch_size, False, 64, pad_id, seed=3, epoch=0, padding_free=True)
    return padded, flat


def test_padding_free_batches_hold_the_same_rows_without_padding(tiny_model_dir, tmp_path):
    tokenizer, examples = tokenized(tiny_model_dir, tmp_path, rows=10)
    padded, flat = both_ways(examples, tokenizer.pad_token_id)
    assert len(flat) == len(padded) == data.batches_per_epoch(examples, 4, False, 64, seed=3)
    for wide, one in zip(padded, flat):
        assert one.row_ids == wide.row_ids and one.attention_mask is None
        real = sum(len(examples[index].input_ids) for index in one.row_ids)
        # One sequence, rounded up to a multiple of SHAPE_MULTIPLE by a tail that is never a target.
        width = one.input_ids.shape[1]
        assert one.input_ids.shape[0] == 1 and width % data.batching.SHAPE_MULTIPLE == 0
        assert real <= width < real + data.batching.SHAPE_MULTIPLE
        assert (one.targets[0, real:] == IGNORE_INDEX).all()
        assert one.supervised_tokens == wide.supervised_tokens
        # Position ids restart at each row (and at the tail); each row's last target is -100 (never the
        # next row's first token).
        starts = (one.position_ids[0] == 0).nonzero().flatten().tolist()
        assert len(starts) == len(one.row_ids) + (width > real)
        assert all(one.targets[0, start - 1] == IGNORE_INDEX for start in starts[1:])
    assert any(wide.attention_mask.eq(0).any() for wide in padded), "the fixture has padding to save"


@pytest.mark.parametrize("attention", [ROW_ATTENTION, "sdpa"])
def test_padding_free_gives_the_padded_loss_and_gradients(tiny_model_dir, tmp_path, attention):
    """Per-row attention (what load_base sets) and transformers' block-diagonal SDPA mask alike."""
    tokenizer, examples = tokenized(tiny_model_dir, tmp_path, rows=6)
    padded, flat = both_ways(examples, tokenizer.pad_token_id, micro_batch_size=6)
    model = build_model(tiny_model_dir).train()
    assert model.config._attn_implementation == ROW_ATTENTION
    model.set_attn_implementation(attention)
    results = []
    for batch in (padded[0], flat[0]):
        model.zero_grad(set_to_none=True)
        loss = summed_loss(model, batch, torch.device("cpu"))
        loss.backward()
        grads = {
            name: parameter.grad.clone() for name, parameter in model.named_parameters() if parameter.requires_grad
        }
        results.append((loss.detach(), grads))
    (loss_padded, grads_padded), (loss_flat, grads_flat) = results
    torch.testing.assert_close(loss_flat, loss_padded, rtol=1e-4, atol=1e-4)
    assert grads_flat.keys() == grads_padded.keys() and any(grad.abs().sum() > 0 for grad in grads_flat.values())
    for name in grads_padded:
        torch.testing.assert_close(grads_flat[name], grads_padded[name], rtol=1e-3, atol=1e-5, msg=name)


def test_cheap_mask_dropout_drops_at_rate_p_and_keeps_the_expectation():
    dropout = CheapMaskDropout(0.05).train()
    x = torch.ones(1000, 1001)  # an odd element count: the last int64 draw is cut
    torch.manual_seed(0)
    out = dropout(x)
    assert out.shape == x.shape
    assert abs(out.eq(0).float().mean().item() - 0.05) < 0.002
    assert abs(out.mean().item() - 1.0) < 0.005
    torch.manual_seed(0)
    assert torch.equal(dropout(x), out), "seeded like torch's dropout"
    assert not torch.equal(dropout(x), out)
    assert torch.equal(dropout.eval()(x), x)


def test_lora_dropout_is_cheap_mask_and_replayed_under_gradient_checkpointing(tiny_model_dir, tmp_path):
    from qlora.adapters import attach_lora
    from qlora.config import LoraSection

    tokenizer, examples = tokenized(tiny_model_dir, tmp_path, rows=4)
    batch = data.epoch_batches(examples, 4, False, 64, tokenizer.pad_token_id, seed=0, epoch=0)[0]
    grads = []
    for checkpointing in (False, True):
        base = tiny_base(tiny_model_dir, gradient_checkpointing=checkpointing)
        model = attach_lora(base, LoraSection(r=8, alpha=16, dropout=0.3), seed=0).train()
        assert sum(isinstance(module, CheapMaskDropout) for module in model.modules()) == 14  # 7 linears x 2 layers
        torch.manual_seed(5)
        summed_loss(model, batch, torch.device("cpu")).backward()
        grads.append({name: p.grad for name, p in model.named_parameters() if p.requires_grad})
    # The recomputed forward must draw the masks the first forward drew, or the grads would differ.
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)


def test_bench_fixture_model_has_the_stated_size(tmp_path):
    sys.path.insert(0, str(REPO))
    from bench.fixture import build_fixture

    fixture = build_fixture(tmp_path, train_rows=20, eval_rows=4)
    assert 20e6 <= fixture["parameters"] <= 30e6
    lines = Path(fixture["train"]).read_text().splitlines()
    assert len(lines) == 20 and len(Path(fixture["eval"]).read_text().splitlines()) == 4


def test_bench_compare_help_runs():
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "compare.py"), "--help"], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0 and "trl-best" in result.stdout


def test_packed_and_padding_free_rows_each_give_their_logits_alone_and_padding_takes_sdpa(tiny_model_dir, tmp_path):
    """Per-row attention (what load_base sets): in one sequence of several rows, as packing and
    padding-free batches build it, no row sees another; a padded batch takes transformers' SDPA."""
    tokenizer, examples = tokenized(tiny_model_dir, tmp_path, rows=3)
    model = build_model(tiny_model_dir).eval()
    ids = torch.randint(0, 300, (1, 30), generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([list(range(10)) + list(range(15)) + list(range(5))])
    assert row_bounds(positions[0]) == [(0, 10), (10, 25), (25, 30)]
    sequences = [(ids, positions, [ids[0, start:end] for start, end in row_bounds(positions[0])])]
    pad_id = tokenizer.pad_token_id
    packed = data.epoch_batches(examples, 1, True, 256, pad_id, 0, 0, shuffle=False)
    padding_free = data.epoch_batches(examples, 3, False, 64, pad_id, 0, 0, shuffle=False, padding_free=True)
    for batch in (packed[0], padding_free[0]):
        assert batch.attention_mask is None and len(batch.row_ids) > 1
        rows = [torch.tensor(examples[row_id].input_ids) for row_id in batch.row_ids]
        sequences.append((batch.input_ids, batch.position_ids, rows))
    with torch.no_grad():
        for input_ids, position_ids, rows in sequences:
            together = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
            alone = torch.cat([model(input_ids=row[None], use_cache=False).logits for row in rows], dim=1)
            # A padding-free batch ends in a padding tail (SHAPE_MULTIPLE): the rows before it are unchanged.
            torch.testing.assert_close(together[:, : alone.shape[1]], alone, rtol=1e-5, atol=1e-5)
        # A padded batch (attention mask) takes transformers' SDPA path: the same logits as with sdpa set.
        two_rows = ids[:, :20].reshape(2, 10)
        mask = torch.tensor([[1] * 10, [1] * 6 + [0] * 4])
        ours = model(input_ids=two_rows, attention_mask=mask, use_cache=False).logits
        model.set_attn_implementation("sdpa")
        torch.testing.assert_close(
            ours, model(input_ids=two_rows, attention_mask=mask, use_cache=False).logits, rtol=0, atol=0
        )


def test_loss_computes_logits_only_at_supervised_positions_and_equals_the_full_loss(tiny_model_dir, tmp_path):
    import torch.nn.functional as F

    tokenizer, examples = tokenized(tiny_model_dir, tmp_path, rows=6)
    padded, flat = both_ways(examples, tokenizer.pad_token_id, micro_batch_size=6)
    model = build_model(tiny_model_dir).train()
    head_positions = []
    model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: head_positions.append(args[0].shape[1])
    )
    for batch in (flat[0], padded[0]):
        results = []
        for full in (False, True):
            model.zero_grad(set_to_none=True)
            torch.manual_seed(0)
            if full:
                logits = model(
                    input_ids=batch.input_ids,
                    position_ids=batch.position_ids,
                    attention_mask=batch.attention_mask,
                    use_cache=False,
                ).logits
                loss = F.cross_entropy(
                    logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
                )
            else:
                # The whole path (tests/test_loss.py: the chunked one gives its loss and gradients).
                loss = summed_loss(model, batch, torch.device("cpu"), chunk_tokens="off")
            loss.backward()
            results.append(
                (loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad})
            )
        (loss_kept, grads_kept), (loss_full, grads_full) = results
        torch.testing.assert_close(loss_kept, loss_full, rtol=1e-5, atol=1e-5)
        for name in grads_full:
            torch.testing.assert_close(grads_kept[name], grads_full[name], rtol=1e-4, atol=1e-6, msg=name)
    # Padding-free: the head saw exactly the supervised positions, far fewer than the tokens.
    assert head_positions[0] == flat[0].supervised_tokens < flat[0].input_ids.shape[1] == head_positions[1]


def test_activation_offload_gives_the_same_losses_and_adapter(tiny_model_dir, tmp_path):
    """train.offload_activations under gradient checkpointing: on a CPU the saved tensors stay in
    host memory, so the numbers must not move at all (on CUDA the activations would be copies,
    the weights never: tests/test_gpu.py)."""
    from qlora.training.offload import is_weight, saved_for_backward_on_host

    assert isinstance(saved_for_backward_on_host(True), torch.autograd.graph.saved_tensors_hooks)
    weight = torch.nn.Parameter(torch.ones(3, 2))
    assert is_weight(weight) and is_weight(weight.t()) and not is_weight(weight * 2)
    tokenizer, examples = tokenized(tiny_model_dir, tmp_path, rows=16)
    runs = []
    for offload in (False, True):
        model = build_model(tiny_model_dir, dropout=0.1)  # load_base turns non-reentrant checkpointing on
        assert model.base_model.model.is_gradient_checkpointing
        loop_settings = settings(max_steps=3, grad_accum_steps=2, offload_activations=offload)
        torch.manual_seed(0)  # the same dropout masks (the job seeds the same way before its loop)
        rows = run_logged(
            model,
            batches_fn(examples, tokenizer.pad_token_id, 4),
            (),
            loop_settings,
            tmp_path / f"metrics-{offload}.jsonl",
        )
        adapter = {
            name: parameter.detach().clone() for name, parameter in model.named_parameters() if parameter.requires_grad
        }
        runs.append(([row["loss"] for row in rows], adapter))
    (losses_off, adapter_off), (losses_on, adapter_on) = runs
    assert len(losses_on) == 3 and losses_on == pytest.approx(losses_off, abs=1e-6)
    assert adapter_on.keys() == adapter_off.keys()
    for name in adapter_off:
        torch.testing.assert_close(adapter_on[name], adapter_off[name], rtol=0, atol=1e-6, msg=name)
    assert any(not torch.equal(tensor, 0 * tensor) for name, tensor in adapter_on.items() if "lora_B" in name), (
        "training moved the adapter"
    )
