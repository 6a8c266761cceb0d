"""train.gradient_checkpointing: selective keeps the 4-bit matmuls' outputs, so backward does
not run them again, and training gives the numbers of full checkpointing, bit for bit.

Also: the config accepts it only for a 4-bit base, and `qlora plan` charges its memory and
credits its compute between full checkpointing and none.
"""

import pytest
import torch

from qlora.adapters.lora import attach_lora
from qlora.config import LoraSection
from qlora.training.loop import summed_loss
from tests.tiny_training import batches_fn, run_logged, settings, tiny_base, tokenized

MODES = (True, "selective", False)


def build(model_dir, mode):
    base = tiny_base(model_dir, gradient_checkpointing=mode)
    return attach_lora(base, LoraSection(r=8, alpha=16, dropout=0.1), seed=0)


def matmuls_4bit_per_step(model, batch) -> int:
    """How many times bitsandbytes' 4-bit matmul kernel runs in one forward + backward.

    Counted by a dispatch mode entered before the checkpoints push theirs: an op the selective
    policy answers from its cache never reaches it (the profiler would count the cache hits too)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        runs = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.runs += func is torch.ops.bitsandbytes.gemm_4bit.default
            return func(*args, **(kwargs or {}))

    summed_loss(
        model, batch, torch.device("cpu")
    ).backward()  # the loss's once-per-model head probe runs here, uncounted
    with Count():
        summed_loss(model, batch, torch.device("cpu")).backward()
    model.zero_grad(set_to_none=True)
    return Count.runs


def test_selective_checkpointing_skips_the_4bit_recompute_and_keeps_every_number(tiny_model_dir, tmp_path):
    import bitsandbytes as bnb

    tokenizer, examples = tokenized(tiny_model_dir, tmp_path, rows=16)
    runs, calls = {}, {}
    for mode in MODES:
        model = build(tiny_model_dir, mode)
        linears = sum(isinstance(module, bnb.nn.Linear4bit) for module in model.modules())
        model.train()
        calls[mode] = matmuls_4bit_per_step(model, batches_fn(examples, tokenizer.pad_token_id, 4)(0)[0]) / linears
        torch.manual_seed(0)  # the same dropout masks in every run (the job seeds the same way)
        rows = run_logged(
            model,
            batches_fn(examples, tokenizer.pad_token_id, 4),
            (),
            settings(max_steps=3, grad_accum_steps=2),
            tmp_path / f"metrics-{mode}.jsonl",
        )
        adapter = {
            name: parameter.detach().clone() for name, parameter in model.named_parameters() if parameter.requires_grad
        }
        runs[mode] = ([row["loss"] for row in rows], adapter)
    # Full checkpointing runs each 4-bit matmul twice (forward, recompute); selective and none once.
    # (The input gradient is a third matmul, a dequantize + mm in MatMul4Bit's backward, in every mode.)
    assert calls == {True: 2, "selective": 1, False: 1}
    (full_losses, full_adapter), (kept_losses, kept_adapter), (none_losses, none_adapter) = (
        runs[True],
        runs["selective"],
        runs[False],
    )
    # Bit-identical: the kept outputs are what the recompute would give.
    assert len(kept_losses) == 3 and kept_losses == full_losses
    for name, tensor in full_adapter.items():
        assert torch.equal(kept_adapter[name], tensor), name
        torch.testing.assert_close(none_adapter[name], tensor, rtol=0, atol=1e-6, msg=name)
    assert none_losses == pytest.approx(full_losses, abs=1e-6)
    assert any(not torch.equal(tensor, 0 * tensor) for name, tensor in kept_adapter.items() if "lora_B" in name), (
        "training moved the adapter"
    )


def test_selective_needs_a_4bit_base(tmp_path):
    from qlora.config import validate
    from qlora.errors import ConfigError

    job = {"model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}, "output": {"dir": "o"}}
    assert (
        validate({**job, "train": {"gradient_checkpointing": "selective"}}).train.gradient_checkpointing == "selective"
    )
    with pytest.raises(
        ConfigError, match=r"train.gradient_checkpointing: selective .* needs quantization.bits: 4 \(got 8\)"
    ):
        validate({**job, "train": {"gradient_checkpointing": "selective"}, "quantization": {"bits": 8}})
    with pytest.raises(
        ConfigError, match=r"train.gradient_checkpointing: expected auto, true, false or selective \(got 'partial'\)$"
    ):
        validate({**job, "train": {"gradient_checkpointing": "partial"}})


def test_plan_puts_selective_between_full_checkpointing_and_none():
    from dataclasses import replace

    from qlora.plan.activations import activation_lines, layer_linears
    from qlora.plan.architecture import load_architecture
    from qlora.plan.memory import flops_per_token
    from qlora.plan.settings import PlanSettings

    arch = load_architecture("llama-3.1-8b")
    full = PlanSettings(seq_len=2048)
    held, flops = {}, {}
    for mode in MODES:
        settings_ = replace(full, gradient_checkpointing=mode)
        held[mode] = activation_lines(arch, settings_)[0][0].bytes
        flops[mode] = flops_per_token(arch, settings_)
    # The bf16 outputs of q, k, v, o, gate, up, down.
    kept_per_token = 2 * arch.layers * sum(linear.out_features for linear in layer_linears(arch))
    assert held["selective"] - held[True] == kept_per_token * 2048
    assert held[True] < held["selective"] < held[False]
    assert flops[True] > flops["selective"] > flops[False]
    # What selective still recomputes: the LoRA branch and attention, a few % of the base's forward.
    assert flops["selective"] - flops[False] < 0.1 * (flops[True] - flops[False])
