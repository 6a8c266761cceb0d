"""A merged model's architecture in llama.cpp's terms: the GGUF architecture, its metadata keys,
and each checkpoint tensor's GGUF name and transform.

Names come from llama.cpp's own `gguf` package (its tensor-name maps); what it does not carry is
the little that llama.cpp's converter (`convert_hf_to_gguf.py`, not packaged) does per family:
- Llama and Mistral (GGUF architecture `llama`): the q and k projections are stored with the
  rotary halves interleaved, as the original checkpoints had them; transformers' checkpoints
  hold them permuted, so they are permuted back here (and transformers' GGUF reader undoes it).
- Llama 3.1's `llama3` rope scaling is a per-frequency factor, stored as the tensor `rope_freqs`.
- Qwen2 keeps its q/k/v biases and needs no permutation.
Anything else is refused by name, before the merge, rather than written and misread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from qlora.errors import ConfigError

# HF model_type -> GGUF architecture (llama.cpp writes Mistral's dense models as `llama`).
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
PERMUTED_QK = {"llama"}
ROPE_TYPES = ("default", "llama3", "linear")


@dataclass(frozen=True)
class GgufArchitecture:
    gguf_name: str
    """llama.cpp's architecture name, the prefix of its metadata keys."""
    block_count: int
    head_count: int
    head_count_kv: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    context_length: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_type: str
    rope: dict = field(default_factory=dict)
    tied_embeddings: bool = False
    sliding_window: Optional[int] = None


def gguf_architecture(config) -> GgufArchitecture:
    """The GGUF view of a transformers config; a one-line error for what we cannot export."""
    model_type = getattr(config, "model_type", None)
    if model_type not in GGUF_ARCHITECTURES:
        raise ConfigError(
            f"--format gguf: architecture {model_type!r} is not exportable; supported: "
            f"{', '.join(sorted(GGUF_ARCHITECTURES))}"
        )
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise ConfigError(
            f"--format gguf: {model_type} with rope_type {rope_type!r} is not exportable; "
            f"supported: {', '.join(ROPE_TYPES)}"
        )
    heads = config.num_attention_heads
    return GgufArchitecture(
        gguf_name=GGUF_ARCHITECTURES[model_type],
        block_count=config.num_hidden_layers,
        head_count=heads,
        head_count_kv=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        context_length=config.max_position_embeddings,
        vocab_size=config.vocab_size,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)),
        rope_type=rope_type,
        rope=rope,
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        sliding_window=getattr(config, "sliding_window", None) if model_type == "mistral" else None,
    )


def add_architecture_metadata(writer, arch: GgufArchitecture) -> None:
    import gguf

    writer.add_context_length(arch.context_length)
    writer.add_embedding_length(arch.hidden_size)
    writer.add_block_count(arch.block_count)
    writer.add_feed_forward_length(arch.intermediate_size)
    writer.add_head_count(arch.head_count)
    writer.add_head_count_kv(arch.head_count_kv)
    writer.add_rope_freq_base(arch.rope_theta)
    writer.add_layer_norm_rms_eps(arch.rms_norm_eps)
    writer.add_vocab_size(arch.vocab_size)
    writer.add_rope_dimension_count(arch.head_dim)
    if arch.head_dim * arch.head_count != arch.hidden_size:
        # llama.cpp derives the head size from embedding_length / head_count unless told otherwise.
        writer.add_key_length(arch.head_dim)
        writer.add_value_length(arch.head_dim)
    if arch.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(arch.rope["factor"]))


class TensorNames:
    """checkpoint name -> GGUF name, through llama.cpp's map for the architecture."""

    def __init__(self, arch: GgufArchitecture):
        import gguf

        self.arch = arch
        model_arch = next(key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == arch.gguf_name)
        self.map = gguf.get_tensor_name_map(model_arch, arch.block_count)

    def gguf_name(self, name: str) -> Optional[str]:
        """None for a tensor the GGUF leaves out (a tied head, rotary caches)."""
        if name.endswith("rotary_emb.inv_freq") or (self.arch.tied_embeddings and name == "lm_head.weight"):
            return None
        gguf_name = self.map.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ConfigError(f"--format gguf: tensor {name} has no llama.cpp name for {self.arch.gguf_name}")
        return gguf_name


def transformed(name: str, tensor, arch: GgufArchitecture):
    """The tensor as llama.cpp expects it (see the module docstring)."""
    if arch.gguf_name in PERMUTED_QK and name.endswith("self_attn.q_proj.weight"):
        return interleave_rotary_halves(tensor, arch.head_count)
    if arch.gguf_name in PERMUTED_QK and name.endswith("self_attn.k_proj.weight"):
        return interleave_rotary_halves(tensor, arch.head_count_kv)
    return tensor


def interleave_rotary_halves(weight, heads: int):
    """Per head, rows [x0..x(d/2-1), y0..y(d/2-1)] -> [x0, y0, x1, y1, ...]: llama.cpp's rotary layout."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def extra_tensors(arch: GgufArchitecture) -> dict:
    """Tensors the GGUF needs that the checkpoint has not: Llama 3.1's rope frequency factors."""
    if arch.rope_type != "llama3":
        return {}
    import torch

    factor = float(arch.rope.get("factor", 8.0))
    low_freq_factor = float(arch.rope.get("low_freq_factor", 1.0))
    high_freq_factor = float(arch.rope.get("high_freq_factor", 4.0))
    original = float(arch.rope.get("original_max_position_embeddings", 8192))
    low_freq_wavelen, high_freq_wavelen = original / low_freq_factor, original / high_freq_factor
    frequencies = 1.0 / (arch.rope_theta ** (torch.arange(0, arch.head_dim, 2, dtype=torch.float32) / arch.head_dim))
    factors = []
    for frequency in frequencies.tolist():
        wavelen = 2 * math.pi / frequency
        if wavelen < high_freq_wavelen:
            factors.append(1.0)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return {"rope_freqs.weight": torch.tensor(factors, dtype=torch.float32)}
