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
from tests.tiny import write_job
from tests.tiny_training import saved_activation_bytes, tiny_base

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


@pytest.mark.parametrize(
    "checkpointing,dropout,compute_dtype",
    [(False, 0.0, "float32"), (False, 0.1, "float32"), (False, 0.1, "bfloat16"), (True, 0.0, "float32")],
)
def test_activation_formula_matches_the_tensors_autograd_saves(tiny256, checkpointing, dropout, compute_dtype):
    """The per-layer formula in qlora/plan/activations.py against a real forward on CPU, within 2%."""
    from qlora.adapters import attach_lora

    base = tiny_base(tiny256, compute_dtype=compute_dtype, gradient_checkpointing=True)
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
        compute_dtype=compute_dtype,
        lora_r=8,
        lora_dropout=dropout,
    )
    planned = line(make_plan(load_architecture(str(tiny256)), settings), "activations").bytes
    assert abs(planned - measured) / measured < 0.02, (planned, measured)


def test_activation_formula_under_fsdp_counts_peft_forward_copies(tiny256):
    """FSDP's LoRA units take peft's own forward (qlora.adapters.lean_lora): every target keeps its
    own dropped copy and mask, in float32 on CPU (4-byte masks), as the fsdp formula counts."""
    from qlora.adapters import attach_lora

    base = tiny_base(tiny256, gradient_checkpointing=True)
    base.gradient_checkpointing_disable()
    model = attach_lora(base, LoraSection(r=8, alpha=16, dropout=0.1), seed=0)
    for module in model.modules():
        module.__dict__.pop("forward", None)  # peft's forward, as a layer whose adapters FSDP wraps runs
    model.train()
    measured = saved_activation_bytes(model, torch.randint(0, 320, (2, 96)))
    settings = PlanSettings(
        micro_batch=2,
        seq_len=96,
        gradient_checkpointing=False,
        compute_dtype="float32",
        lora_r=8,
        lora_dropout=0.1,
        dropout_mask_bytes=4,
        strategy="fsdp",
        world_size=2,
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
    # A tiny model's compute per token in a unit that shows it (not "0.0 GFLOP").
    (compute,) = [line for line in text.stdout.splitlines() if line.strip().startswith("compute:")]
    assert "MFLOP per training token" in compute and float(compute.split()[1]) > 0

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
        tmp_path,
        tiny_model_dir,
        # checkpointing named: auto would choose its mode against each budget below (tests/test_checkpointing_mode.py)
        train={
            "micro_batch_size": "auto",
            "grad_accum_steps": 1,
            "effective_batch_size": 12,
            "gradient_checkpointing": True,
        },
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


# --------------------------------------------------------------------------- several GPUs


def llama70_layer_by_hand(r: int = 16) -> tuple[int, int]:
    """(packed 4-bit code bytes, LoRA params) of one Llama-3.3-70B decoder layer, from its config.json
    numbers: hidden 8192, intermediate 28672, 8 KV heads of 128, all-linear LoRA."""
    hidden, intermediate, kv = 8192, 28672, 8 * 128
    shapes = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden)] + [(hidden, intermediate)] * 3
    return sum(a * b for a, b in shapes) // 2, sum(r * (a + b) for a, b in shapes)


def test_fsdp_shards_the_resident_lines_and_adds_the_gathered_units():
    from dataclasses import replace

    arch = load_architecture("llama-3.3-70b")
    single = make_plan(arch, PlanSettings(seq_len=2048))
    codes_per_layer, lora_per_layer = llama70_layer_by_hand()
    codes = 80 * codes_per_layer
    statistics = line(single, "base_linear_weights").bytes - codes
    assert 0.03 < statistics / codes < 0.04  # absmax + nested absmax: ~0.127 of 4 bits
    for gpus in (2, 8):
        fsdp = make_plan(arch, replace(PlanSettings(seq_len=2048), world_size=gpus, strategy="fsdp"))
        # The codes are sharded; the quantization statistics stay whole on every GPU.
        assert line(fsdp, "base_linear_weights").bytes == -(-codes // gpus) + statistics
        for name in ("lora_weights", "lora_grads", "optimizer_state"):
            assert line(fsdp, name).bytes == -(-line(single, name).bytes // gpus), name
        embeddings_and_head = 2 * 128256 * 8192 * 2
        assert line(fsdp, "fsdp_gathered_root").bytes == embeddings_and_head + 8192 * 2
        two_layers = 2 * (codes_per_layer + 2 * 8192 * 2 + lora_per_layer * 4)
        assert line(fsdp, "fsdp_gathered_layers").bytes == two_layers
        assert line(fsdp, "fsdp_layer_grads").bytes == lora_per_layer * 4
        # Every rank runs a whole micro-batch: activations and phases are one GPU's, but for the
        # recomputed layer: FSDP's LoRA units take peft's forward (each target keeps its own
        # dropped input; qlora.adapters.lean_lora).
        for name in ("activations", "logits_and_loss", "dequant_workspace"):
            assert line(fsdp, name).bytes == line(single, name).bytes, name
        assert line(fsdp, "layer_backward").bytes > line(single, "layer_backward").bytes
        weights = sum(line(fsdp, name).bytes for name in ("base_linear_weights", "base_dense_weights"))
        single_weights = sum(line(single, name).bytes for name in ("base_linear_weights", "base_dense_weights"))
        assert abs(weights - (single_weights - statistics) / gpus - statistics) < 64 * 1024
        assert sum(item.bytes for item in fsdp.lines if item.counted) == fsdp.total_bytes
    two = make_plan(arch, replace(PlanSettings(seq_len=2048), world_size=2, strategy="fsdp"))
    eight = make_plan(arch, replace(PlanSettings(seq_len=2048), world_size=8, strategy="fsdp"))
    assert eight.total_bytes < two.total_bytes < single.total_bytes


def test_ddp_adds_exactly_the_gradient_buckets_and_one_gpu_is_todays_plan():
    from dataclasses import replace

    arch = load_architecture("llama-3.1-8b")
    settings = PlanSettings(seq_len=2048)
    single = make_plan(arch, settings)
    lora_params = single.parameters["lora"]
    for gpus in (2, 8):
        ddp = make_plan(arch, replace(settings, world_size=gpus, strategy="ddp"))
        assert line(ddp, "ddp_grad_buckets").bytes == lora_params * 4
        assert ddp.allocated_bytes - single.allocated_bytes == lora_params * 4
        assert ddp.total_bytes > single.total_bytes
    # One GPU: neither strategy changes a line (FSDP on one rank does not shard).
    for strategy in ("ddp", "fsdp"):
        assert make_plan(arch, replace(settings, strategy=strategy)).lines == single.lines


def test_cli_answers_llama_70b_on_two_24gb_gpus_with_fsdp():
    job = str(ROOT / "configs" / "llama-3.3-70b-48gb.yaml")  # data.max_seq_len 2048
    small = run_cli("plan", job, "--gpu-memory", "24GiB", "--gpus", "2", "--strategy", "fsdp")
    assert small.returncode == 0, small.stderr
    assert "on 2 GPUs with fsdp" in small.stdout and "fsdp_gathered_layers" in small.stdout
    assert "DOES NOT FIT in 24.0 GiB per GPU x 2" in small.stdout
    assert "does not fit 2 x 24.0 GiB GPUs with fsdp; fits 4 with --strategy fsdp: " in small.stdout

    record = json.loads(
        run_cli("plan", job, "--gpu-memory", "24GiB", "--gpus", "2", "--strategy", "fsdp", "--json").stdout
    )
    assert (record["settings"]["world_size"], record["settings"]["strategy"], record["fits"]) == (2, "fsdp", False)
    assert record["suggestions"]["fits_on_gpus"]["gpus"] == 4
    assert record["suggestions"]["fits_on_gpus"]["per_gpu_bytes"] <= 24 * 2**30 < record["total_bytes"]

    large = run_cli("plan", job, "--gpu-memory", "48GiB", "--gpus", "2", "--strategy", "fsdp", "--json")
    assert large.returncode == 0 and json.loads(large.stdout)["fits"] is True
    # The job's train.distributed is the default strategy; --strategy overrides it.
    from_job = run_cli("plan", job, "--gpus", "2", "--set", "train.distributed=fsdp", "--json")
    assert json.loads(from_job.stdout)["settings"]["strategy"] == "fsdp"
    overridden = run_cli("plan", job, "--gpus", "2", "--set", "train.distributed=fsdp", "--strategy", "ddp", "--json")
    assert json.loads(overridden.stdout)["settings"]["strategy"] == "ddp"


def test_cli_says_how_many_gpus_a_job_that_does_not_fit_one_needs():
    result = run_cli("plan", "llama-3.3-70b", "--gpu", "A100-40", "--set", "data.max_seq_len=2048")
    assert result.returncode == 0, result.stderr
    assert "DOES NOT FIT in 40.0 GiB (A100-40)" in result.stdout
    assert "does not fit one 40.0 GiB GPU; fits 2 with --strategy fsdp: " in result.stdout
    fitting = run_cli("plan", "llama-3.1-8b", "--gpu", "4090")
    assert fitting.returncode == 0 and "does not fit" not in fitting.stdout


def test_cli_plan_bad_gpus_and_strategy_are_one_line_errors():
    for args, culprit in [
        (("--gpus", "0"), "--gpus"),
        (("--gpus", "two"), "--gpus"),
        (("--strategy", "zero"), "--strategy"),
        (("--gpus", "2", "--strategy", "fsdp", "--set", "quantization.bits=8"), "--strategy fsdp"),
    ]:
        result = run_cli("plan", "llama-3.1-8b", *args)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.startswith("error: ") and culprit in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1


def test_auto_micro_batch_plans_one_gpu_of_the_launch(tmp_path, tiny_model_dir, monkeypatch):
    from dataclasses import replace

    from qlora.config import load_config
    from qlora.plan.micro_batch import launched_settings

    job = write_job(tmp_path, tiny_model_dir, train={"distributed": "fsdp"})
    config = load_config(job)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    alone = launched_settings(config)
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert launched_settings(config) == replace(alone, world_size=4, strategy="fsdp")


@pytest.mark.parametrize(("model", "low", "high"), [("llama-3.1-8b", 0.45, 0.6), ("llama-3.3-70b", 0.95, 1.0)])
def test_the_paged_line_counts_only_the_state_bitsandbytes_pages(model, low, high):
    """bitsandbytes pages the moments of tensors of 100k+ values only (get_state_buffer): at r=16
    the 8B's 4096-wide LoRA matrices (65k values) stay ordinary device tensors and only the MLP's
    14336-wide ones are paged; the 70B's are 8192 and 28672 wide, nearly all over the line."""
    arch = load_architecture(str(ROOT / "configs" / "arch" / model))
    paged = make_plan(arch, PlanSettings(micro_batch=1, seq_len=2048, lora_r=16, optimizer="paged_adamw_8bit"))
    state = next(line.bytes for line in paged.lines if line.name == "optimizer_state")
    assert low < paged.paged_bytes / state <= high
    unpaged = make_plan(arch, PlanSettings(micro_batch=1, seq_len=2048, lora_r=16, optimizer="adamw_8bit"))
    assert unpaged.paged_bytes == 0
