"""MFU: the useful-FLOPs formula (qlora/plan/flops.py) against torch's own FLOP counter, the measured
peak cached per device, and `mfu` reported by a real run."""

import json

import pytest
import torch

from qlora.plan.flops import FlopModel
from qlora.plan.peak_flops import CACHE_FILE, peak_matmul_flops
from qlora.user_cache import cache_dir
from tests.tiny_training import counted_lora_llama


def counted_flops(length: int):
    """(our FlopModel, torch's counts: linear matmuls, attention) of one float32 forward+backward
    of a row of `length` tokens through a tiny Llama with LoRA on every linear (dropout 0)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model, arch, lora_params = counted_lora_llama("sdpa")
    ids = torch.randint(0, 320, (1, length))
    # The counter has no formula for CPU flash attention; the math backend's attention is
    # batched matmuls (bmm), the linears are mm/addmm.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(input_ids=ids).logits.sum().backward()
    counts = counter.get_flop_counts()
    totals = {}
    for op, flops in counts["Global"].items():
        kind = "attention" if "bmm" in str(op) else "linear"
        totals[kind] = totals.get(kind, 0) + flops
    # transformers 5.17 (our lowest) builds the rotary angles as a matmul (inv_freq @ positions, a
    # bmm of 2 * head_dim/2 * L FLOPs); 5.24 multiplies elementwise. Neither is attention.
    rotary = [ops for module, ops in counts.items() if module.endswith("rotary_emb")]
    totals["attention"] -= sum(flops for ops in rotary for op, flops in ops.items() if "bmm" in str(op))
    return FlopModel.of(arch, lora_params), totals


def test_useful_flops_match_torch_flop_counter():
    length = 48
    model, counted = counted_flops(length)
    # Linears (base forward + input grads, LoRA forward + both grads, the head): exact.
    attention = 3 * model.attention_forward(length)
    linear = model.useful([length], head_positions=length) - attention
    assert counted["linear"] == pytest.approx(linear, rel=1e-6)
    # The math backend computes full-square attention and masks it; useful FLOPs are the causal
    # part (query i sees i+1 keys): the counter's number is 2L/(L+1) times ours.
    assert counted["attention"] == pytest.approx(attention * 2 * length / (length + 1), rel=1e-6)


def test_useful_flops_add_up_over_rows_and_checkpointing_only_adds_hardware_flops():
    model = FlopModel(base_linear_weights=1000, lora_params=10, head_weights=500, attention_width=8)
    assert model.useful([3, 5], 8) == pytest.approx(model.useful([3], 3) + model.useful([5], 5))
    assert model.useful([3, 5], 2) < model.useful([3, 5], 8)  # the head only where logits are read
    assert (
        model.per_token(64, gradient_checkpointing=True)
        > model.per_token(64, gradient_checkpointing=False)
        == pytest.approx(model.useful([64], 64) / 64)
    )


def test_peak_matmul_rate_is_measured_once_and_cached(tmp_path, monkeypatch):
    import qlora.plan.peak_flops

    monkeypatch.setenv("QLORA_CACHE_DIR", str(tmp_path))
    # The load this machine reports is not the test's to choose.
    monkeypatch.setattr(qlora.plan.peak_flops, "cpu_load", lambda: 0.3)
    first = peak_matmul_flops(torch.device("cpu"), "float32")
    assert first["flops_per_s"] > 1e8 and first["torch"] == torch.__version__ and first["load_per_cpu"] == 0.3
    saved = json.loads((cache_dir() / CACHE_FILE).read_text())
    (key,) = saved
    assert torch.__version__ in key and "float32" in key
    saved[key]["flops_per_s"] = 123.0  # a second call reads the cache instead of measuring again
    (cache_dir() / CACHE_FILE).write_text(json.dumps(saved))
    assert peak_matmul_flops(torch.device("cpu"), "float32")["flops_per_s"] == 123.0


def test_a_peak_measured_on_a_busy_cpu_is_measured_again_when_quiet(tmp_path, monkeypatch):
    """Other work can only make the peak low (and MFU high): a busy measurement is redone when
    the machine is quiet, and the higher rate is kept."""
    import qlora.plan.peak_flops

    monkeypatch.setenv("QLORA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(qlora.plan.peak_flops, "cpu_load", lambda: 3.5)  # oversubscribed: 3.5 runnable tasks per core
    real = peak_matmul_flops(torch.device("cpu"), "float32")["flops_per_s"]
    path = cache_dir() / CACHE_FILE
    saved = json.loads(path.read_text())
    (key,) = saved
    saved[key]["flops_per_s"] = 123.0  # as if the busy measurement had come out low
    path.write_text(json.dumps(saved))
    assert peak_matmul_flops(torch.device("cpu"), "float32")["flops_per_s"] == 123.0  # still busy: kept
    monkeypatch.setattr(qlora.plan.peak_flops, "cpu_load", lambda: 0.2)
    again = peak_matmul_flops(torch.device("cpu"), "float32")
    assert again["flops_per_s"] > 1e8 and again["flops_per_s"] > 0.2 * real and again["load_per_cpu"] == 0.2
    assert json.loads(path.read_text())[key]["flops_per_s"] == again["flops_per_s"]
    path.write_text(json.dumps({key: {**again, "flops_per_s": 9e15}}))  # a higher rate already cached (and quiet) stays
    assert peak_matmul_flops(torch.device("cpu"), "float32")["flops_per_s"] == 9e15


def test_a_run_reports_mfu_in_its_metrics_and_summary(trained_adapter):
    rows = [json.loads(line) for line in (trained_adapter / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "loss" in row]
    assert steps and all(0 < row["mfu"] <= 1 for row in steps)
    summary = json.loads((trained_adapter / "summary.json").read_text())
    assert 0 < summary["mfu"] <= 1 and summary["peak_flops_per_s"] > 0 and summary["useful_flops"] > 0
