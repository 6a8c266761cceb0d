"""The loop's explicit precision (qlora.training.precision): what each compute dtype builds, and
the float16 loss-scaling path (scale, unscale before clipping, step, update) changing nothing
but the scale when gradients are finite."""

import json
import math

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


# Two jobs in one process, as the service's worker or a notebook runs them. Nothing of ours is
# process-wide: the precision is built per job (no accelerate Accelerator / AcceleratorState,
# whose mixed-precision mode is fixed once per process), and the loop takes its device from the
# parameters it trains.


def test_two_jobs_in_one_process_with_other_compute_dtypes_each_run_as_alone(tiny_model_dir, tmp_path):
    from qlora.config import load_config
    from qlora.job.run import run_job
    from tests.tiny import write_job

    losses = {}
    for name, compute_dtype in (("first", "float32"), ("bf16", "bfloat16"), ("again", "float32")):
        (tmp_path / name).mkdir()
        job = write_job(tmp_path / name, tiny_model_dir, quantization={"compute_dtype": compute_dtype})
        result = run_job(load_config(job), echo=lambda line: None)
        rows = [json.loads(line) for line in (tmp_path / name / "out" / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [row["loss"] for row in rows if "loss" in row]
        assert result.loop.steps == 4 and all(math.isfinite(loss) for loss in losses[name])
    assert losses["again"] == losses["first"]  # bit for bit: the bf16 job in between left nothing behind
    assert losses["bf16"] != losses["first"]  # and it computed in its own dtype


def test_the_loop_run_twice_autocasts_each_run_in_its_own_precision(tiny_model_dir, tmp_path):
    """CPU autocast stands in for the GPU's: a bf16 run, then a float32 run in the same process."""
    tokenizer, examples = tokenized(tiny_model_dir, tmp_path)
    seen = {}
    for name, precision in (
        ("bf16", Precision("cpu", torch.bfloat16, torch.amp.GradScaler("cpu", enabled=False))),
        ("float32", build_precision("float32", "cpu")),
    ):
        model = build_model(tiny_model_dir)
        lora_a = next(module for name_, module in model.named_modules() if name_.endswith("q_proj.lora_A.default"))
        states = set()

        def record(module, inputs, output, states=states):
            states.add((torch.is_autocast_enabled("cpu"), output.dtype))

        lora_a.register_forward_hook(record)
        result = train_tiny(model, batches_fn(examples, tokenizer.pad_token_id, 4), precision=precision)
        seen[name] = states
        assert result.steps == 3 and math.isfinite(result.final_loss)
    assert seen == {"bf16": {(True, torch.bfloat16)}, "float32": {(False, torch.float32)}}
