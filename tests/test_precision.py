"""The loop's explicit precision (qlora.training.precision): what each compute dtype builds, and
the float16 loss-scaling path (scale, unscale before clipping, step, update) changing nothing
but the scale when gradients are finite."""

import pytest
import torch

from qlora.training.precision import Precision, build_precision
from tests.tiny_training import batches_fn, build_model, settings, tokenized, train_tiny


@pytest.mark.parametrize("compute_dtype", ["bfloat16", "float32"])
def test_a_cpu_run_computes_in_the_models_own_dtypes(compute_dtype):
    precision = build_precision(compute_dtype, "cpu")
    assert precision.autocast_dtype is None and not precision.scaler.is_enabled()
    with precision.autocast():
        assert not torch.is_autocast_enabled("cpu")


def test_a_gpu_run_autocasts_in_the_compute_dtype():
    assert build_precision("bfloat16", "cuda").autocast_dtype == torch.bfloat16
    assert build_precision("float16", "cuda").autocast_dtype == torch.float16
    assert build_precision("float32", "cuda").autocast_dtype is None
    assert not build_precision("bfloat16", "cuda").scaler.is_enabled()  # bf16 needs no loss scaling


def test_loss_scaling_trains_exactly_as_no_scaling(tiny_model_dir, tmp_path):
    """A power-of-two scale is exact in float32: scaled backward + unscale before the clip must
    give bit-identical steps; the scaler's state rides in every checkpoint."""
    tokenizer, examples = tokenized(tiny_model_dir, tmp_path)
    runs, saved_scaler = [], []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**16)):
        precision = Precision("cpu", None, scaler) if scaler else None
        model = build_model(tiny_model_dir)
        result = train_tiny(
            model,
            batches_fn(examples, tokenizer.pad_token_id, 4),
            (),
            settings(max_steps=4, max_grad_norm=0.5, save_every=2),  # a clip that bites: unscale must come first
            precision=precision,
            save_checkpoint=lambda state: saved_scaler.append(state.grad_scaler),
        )
        adapter = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
        runs.append((result.final_loss, adapter))
    (loss_plain, adapter_plain), (loss_scaled, adapter_scaled) = runs
    assert loss_scaled == loss_plain
    assert all(torch.equal(adapter_plain[name], adapter_scaled[name]) for name in adapter_plain)
    assert saved_scaler[:2] == [None, None]
    assert saved_scaler[2]["scale"] == 2.0**16 and saved_scaler[3]["_growth_tracker"] == 4
