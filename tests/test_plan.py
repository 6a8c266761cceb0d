"""`qlora plan`: parameter counts of the shipped configs, memory arithmetic checked against real
tensors of tiny 4-bit models (weights, LoRA, optimizer state, saved activations), the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlora.config import LoraSection
from qlora.plan.architecture import load_architecture, shipped_architectures
from qlora.plan.memory import largest_micro_batch, make_plan
from qlora.plan.settings import PlanSettings
from tests.tiny import build_tiny_model, write_job
from tests.tiny_training import tiny_base

ROOT = Path(__file__).resolve().parent.parent

# Published parameter counts (model cards / safetensors index totals).
PUBLISHED = {
    "llama-2-7b": 6.74e9,
    "llama-2-13b": 13.0e9,
    "llama-2-70b": 69.0e9,
    "llama-3.1-8b": 8.03e9,
    "llama-3.2-1b": 1.24e9,
    "llama-3.2-3b": 3.21e9,
    "llama-3.3-70b": 70.6e9,
    "mistral-7b-v0.3": 7.25e9,
    "qwen2.5-7b": 7.62e9,
    "qwen2.5-72b": 72.7e9,
    "gemma-2-9b": 9.24e9,
}


def line(plan, name):
    return next(item for item in plan.lines if item.name == name)


def test_every_shipped_architecture_has_its_published_parameter_count():
    assert set(shipped_architectures()) == set(PUBLISHED)
    for name, published in PUBLISHED.items():
        total = load_architecture(name).total_params
        assert abs(total - published) / published < 0.01, (name, total)


def test_llama2_7b_nf4_weights_match_the_qlora_paper_and_70b_fits_48gb():
    llama7 = make_plan(load_architecture("llama-2-7b"), PlanSettings())
    weights = line(llama7, "base_linear_weights").bytes + line(llama7, "base_dense_weights").bytes
    assert abs(weights - 3.9e9) / 3.9e9 < 0.03
    bits = 8 * line(llama7, "base_linear_weights").bytes / load_architecture("llama-2-7b").quantized_params
    assert 4.12 < bits < 4.135  # 4 + 8/64 + 32/(64*256) with double quant
    single = make_plan(load_architecture("llama-2-7b"), PlanSettings(double_quant=False))
    assert (
        4.49 < 8 * line(single, "base_linear_weights").bytes / load_architecture("llama-2-7b").quantized_params < 4.51
    )

    settings = PlanSettings(micro_batch=1, seq_len=2048, gradient_checkpointing=True)
    assert make_plan(load_architecture("llama-2-70b"), settings).total_bytes < 48e9
    # Llama 3's 128k vocabulary: 2.1 GB more embedding/head and 2.4 GB more logits; torch's
    # peak still stays under 48 GB, the whole card (slack + context) does not.
    assert make_plan(load_architecture("llama-3.3-70b"), settings).allocated_bytes < 48e9


def test_breakdown_sums_to_the_total_and_checkpointing_saves_memory():
    arch = load_architecture("llama-3.1-8b")
    plan = make_plan(arch, PlanSettings(micro_batch=2, seq_len=4096), budget_bytes=24 * 2**30)
    assert sum(item.bytes for item in plan.lines if item.counted) == plan.total_bytes
    without = make_plan(arch, PlanSettings(micro_batch=2, seq_len=4096, gradient_checkpointing=False))
    assert line(without, "activations").bytes > 10 * line(plan, "activations").bytes
    largest = plan.suggestions["largest_micro_batch"]
    budget = 24 * 2**30
    assert make_plan(arch, PlanSettings(micro_batch=largest, seq_len=4096), budget).fits
    assert not make_plan(arch, PlanSettings(micro_batch=largest + 1, seq_len=4096), budget).fits
    assert largest_micro_batch(arch, PlanSettings(seq_len=4096), 4 * 2**30) == 0


@pytest.fixture(scope="module")
def tiny256(tmp_path_factory):
    """A 2-layer Llama with hidden 256: LoRA A matrices at r=16 reach bitsandbytes' 8-bit optimizer threshold."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny256"), hidden=256, layers=2)


@pytest.mark.parametrize("compute_dtype,double_quant", [("float32", True), ("bfloat16", True), ("float32", False)])
def test_planned_weight_bytes_equal_the_loaded_4bit_model(tiny256, compute_dtype, double_quant):
    from qlora.model.base import weight_bytes

    model = tiny_base(tiny256, compute_dtype=compute_dtype, double_quant=double_quant)
    plan = make_plan(
        load_architecture(str(tiny256)), PlanSettings(compute_dtype=compute_dtype, double_quant=double_quant)
    )
    planned = line(plan, "base_linear_weights").bytes + line(plan, "base_dense_weights").bytes
    measured = weight_bytes(model)
    assert abs(planned - measured) / measured < 0.02, (planned, measured)


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit"])
def test_lora_and_optimizer_bytes_equal_the_real_tensors(tiny256, optimizer):
    from qlora.adapters import attach_lora
    from qlora.config import LoraSection, TrainSection
    from qlora.training.builders import build_optimizer

    model = attach_lora(tiny_base(tiny256), LoraSection(r=16, alpha=32, dropout=0.0), seed=0)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer_object = build_optimizer(model, TrainSection(optimizer=optimizer))
    input_ids = torch.randint(0, 320, (2, 32))
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    optimizer_object.step()

    plan = make_plan(
        load_architecture(str(tiny256)), PlanSettings(compute_dtype="float32", lora_r=16, optimizer=optimizer)
    )
    assert line(plan, "lora_weights").bytes == sum(p.numel() * p.element_size() for p in trainable)
    assert line(plan, "lora_grads").bytes == sum(p.grad.numel() * p.grad.element_size() for p in trainable)
    state = sum(
        value.numel() * value.element_size()
        for per_param in optimizer_object.state.values()
        for value in per_param.values()
        if torch.is_tensor(value) and value.dim() > 0
    )
    assert abs(line(plan, "optimizer_state").bytes - state) / state < 0.02, (line(plan, "optimizer_state").bytes, state)


def saved_activation_bytes(model, input_ids) -> int:
    """Bytes of the distinct storages autograd saves for backward in one forward, parameters excluded."""
    parameters = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}
    saved = {}

    def pack(tensor):
        key = tensor.untyped_storage().data_ptr()
        if key not in parameters:
            saved[key] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=input_ids, use_cache=False)
    return sum(saved.values())


@pytest.mark.parametrize("checkpointing,dropout", [(False, 0.0), (False, 0.1), (True, 0.0)])
def test_activation_formula_matches_the_tensors_autograd_saves(tiny256, checkpointing, dropout):
    """The per-layer formula in qlora/plan/memory.py against a real forward (float32 on CPU, where a
    dropout mask has the activation's dtype), within 2%."""
    from qlora.adapters import attach_lora

    base = tiny_base(tiny256, gradient_checkpointing=True)
    if not checkpointing:
        base.gradient_checkpointing_disable()  # input grads stay on, as in training
    model = attach_lora(base, LoraSection(r=8, alpha=16, dropout=dropout), seed=0)
    model.train()
    batch, seq_len = 2, 96
    measured = saved_activation_bytes(model, torch.randint(0, 320, (batch, seq_len)))
    settings = PlanSettings(
        micro_batch=batch,
        seq_len=seq_len,
        gradient_checkpointing=checkpointing,
        compute_dtype="float32",
        lora_r=8,
        lora_dropout=dropout,
        dropout_mask_bytes=4,
    )
    planned = line(make_plan(load_architecture(str(tiny256)), settings), "activations").bytes
    assert abs(planned - measured) / measured < 0.02, (planned, measured)


def run_cli(*args, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "qlora.cli", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def test_cli_plan_json_for_a_named_gpu_and_text_for_a_job(tmp_path, tiny_model_dir):
    result = run_cli(
        "plan", "meta-llama/Llama-3.1-8B-Instruct", "--gpu", "4090", "--json", "--set", "data.max_seq_len=4096"
    )
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["fits"] is True and record["gpu"] == "RTX-4090" and record["settings"]["seq_len"] == 4096
    assert record["total_bytes"] == sum(item["bytes"] for item in record["breakdown"] if item["counted"])
    assert record["tokens_per_s"] > 0 and record["suggestions"]["largest_micro_batch"] >= 1

    job = write_job(tmp_path, tiny_model_dir)
    text = run_cli("plan", str(job), "--gpu-memory", "1GiB")
    assert text.returncode == 0, text.stderr
    assert (
        "FITS in 1.0 GiB" in text.stdout and "base_linear_weights" in text.stdout and "logits_and_loss" in text.stdout
    )

    too_small = run_cli("plan", "llama-3.3-70b", "--gpu", "A100-40", "--json")
    assert too_small.returncode == 0 and json.loads(too_small.stdout)["fits"] is False


def test_cli_plan_errors_are_one_line_with_exit_codes():
    for args, code, culprit in [
        (("plan", "no-such-model"), 5, "no-such-model"),
        (("plan", "llama-2-7b", "--gpu", "Z80"), 2, "--gpu Z80"),
        (("plan", "llama-2-7b", "--gpu-memory", "lots"), 2, "--gpu-memory"),
        (("plan", "llama-2-7b", "--set", "lora.rank=8"), 2, "lora.rank"),
    ]:
        result = run_cli(*args)
        assert result.returncode == code, (args, result.stderr)
        assert (
            result.stderr.startswith("error: ")
            and culprit in result.stderr
            and len(result.stderr.strip().splitlines()) == 1
        )


def test_auto_micro_batch_takes_the_largest_that_fits_and_keeps_the_effective_batch(tmp_path, tiny_model_dir):
    from qlora.config import load_config
    from qlora.errors import ConfigError
    from qlora.job.run import validate_job
    from qlora.plan.settings import settings_from_job

    job = write_job(
        tmp_path, tiny_model_dir, train={"micro_batch_size": "auto", "grad_accum_steps": 1, "effective_batch_size": 12}
    )
    with pytest.raises(ConfigError, match="train.memory_budget"):
        validate_job(load_config(job), echo=lambda text: None)

    config = load_config(job)
    arch = load_architecture(config.model.name_or_path)
    one = make_plan(arch, settings_from_job(config, micro_batch=1)).total_bytes
    five = make_plan(arch, settings_from_job(config, micro_batch=5)).total_bytes
    budget = (five + make_plan(arch, settings_from_job(config, micro_batch=6)).total_bytes) // 2  # 5 fits, 6 does not
    config = load_config(job, [f"train.memory_budget={budget}"])
    validate_job(config, echo=lambda text: None)
    # 5 fits but does not divide 12: the largest divisor that fits is 4, with 3 accumulation steps.
    assert (config.train.micro_batch_size, config.train.grad_accum_steps) == (4, 3)
    with pytest.raises(ConfigError, match="even one sequence"):
        validate_job(load_config(job, [f"train.memory_budget={one - 1}"]), echo=lambda text: None)
