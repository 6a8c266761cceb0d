"""`model.init: random`: a real architecture from config.json alone, built straight into NF4
one linear at a time, trained through the normal job path."""

import json
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from qlora.plan.architecture import load_architecture
from qlora.plan.memory import make_plan
from qlora.plan.settings import PlanSettings
from tests.tiny import write_job


class LiveTensorBytes(TorchDispatchMode):
    """Watches every tensor of one dtype that torch creates and tracks the peak bytes alive at once."""

    def __init__(self, dtype):
        super().__init__()
        self.dtype, self.live, self.peak = dtype, {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.dtype == self.dtype and tensor.device.type != "meta":
                key = tensor.untyped_storage().data_ptr()
                if key not in self.live:
                    self.live[key] = tensor.untyped_storage().nbytes()
                    weakref.finalize(tensor, self.live.pop, key, None)
                    self.peak = max(self.peak, sum(self.live.values()))
        return out


def write_config_only(directory, hidden=256, layers=8):
    """A model folder with config.json and nothing else: no weights to load."""
    from transformers import LlamaConfig

    LlamaConfig(
        vocab_size=320,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        eos_token_id=2,
        pad_token_id=0,
        bos_token_id=None,
    ).save_pretrained(str(directory))
    return directory


def test_random_base_is_built_one_linear_at_a_time_into_nf4(tmp_path):
    from qlora.config import QuantizationSection
    from qlora.model.base import weight_bytes
    from qlora.model.random_init import build_random_base

    config_dir = write_config_only(tmp_path / "arch")
    arch = load_architecture(str(config_dir))
    with LiveTensorBytes(torch.bfloat16) as watch:
        model = build_random_base(str(config_dir), QuantizationSection(compute_dtype="bfloat16"), seed=0)
    full_16bit = 2 * arch.total_params
    largest_linear = 2 * max(linear.weights for linear in arch.linears)
    dense = 2 * arch.dense_params
    # Never more bf16 alive than the layers kept in bf16 + one linear being quantized (+ its copy).
    assert largest_linear <= watch.peak <= dense + 2 * largest_linear, (watch.peak, dense, largest_linear)
    assert watch.peak < 0.2 * full_16bit
    # The same module tree from_pretrained gives a 4-bit model, and the planned bytes.
    assert getattr(model, "is_loaded_in_4bit", False) and model.hf_quantizer is not None
    assert sum(module.__class__.__name__ == "Linear4bit" for module in model.modules()) == len(arch.linears)
    assert not any(parameter.is_meta for parameter in model.parameters())
    plan = make_plan(arch, PlanSettings(compute_dtype="bfloat16"))
    assert weight_bytes(model) == sum(line.bytes for line in plan.lines if line.name.startswith("base_"))
    weights = model.model.layers[0].self_attn.q_proj.weight
    dequantized = __import__("bitsandbytes").functional.dequantize_4bit(weights.data, weights.quant_state)
    assert abs(dequantized.float().std().item() - 0.02) < 0.004  # the config's initializer_range
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))


def test_random_base_trains_through_the_job_path(tmp_path, tiny_model_dir):
    from qlora.cli.main import main

    config_dir = write_config_only(tmp_path / "arch", hidden=64, layers=2)
    job = write_job(
        tmp_path,
        config_dir,
        model={"name_or_path": str(config_dir), "init": "random", "tokenizer": str(tiny_model_dir)},
        train={"max_steps": 2, "micro_batch_size": 2, "learning_rate": 1e-3, "optimizer": "adamw", "seed": 0},
    )
    assert main(["train", str(job)]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["final_loss"] > 0
    assert (tmp_path / "out" / "adapter_model.safetensors").stat().st_size > 0
    assert "init: random" in (tmp_path / "out" / "config.yaml").read_text()
