"""A model's shape from its config.json alone: the skeleton on the meta device, no weights.

`qlora plan` and the random-weight base (`model.init: random`) both start here. A model source
is a local model folder, a name in configs/arch/ (`llama-3.1-8b`), or a hub id whose config is
shipped there (configs/arch/hub_ids.yaml), so planning works offline. transformers is imported inside the functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from qlora.errors import ModelError

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"
ARCH_DIR = CONFIGS_DIR / "arch"


@dataclass(frozen=True)
class Linear:
    name: str  # module path, e.g. model.layers.0.self_attn.q_proj
    in_features: int
    out_features: int

    @property
    def weights(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class Architecture:
    """Everything the memory arithmetic needs, read off the meta skeleton."""

    source: str
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int
    linears: tuple[Linear, ...]  # every linear a 4-bit load quantizes: all but the output head
    embedding_params: int  # input embeddings (counted once when tied to the head)
    head_params: int  # output head when it is NOT tied to the embeddings, else 0
    norm_params: int
    bias_params: int  # linear biases stay in the compute dtype next to the 4-bit weight
    other_params: int  # anything else not quantized
    buffer_bytes: int  # rotary tables etc., at their own dtype
    norms_per_layer: int  # RMSNorms of hidden size inside one decoder layer (2 for Llama, 4 for Gemma 2)
    logit_softcap: bool  # Gemma 2 squashes logits with tanh: one more vocab-sized tensor

    @property
    def quantized_params(self) -> int:
        return sum(linear.weights for linear in self.linears)

    @property
    def dense_params(self) -> int:
        return self.embedding_params + self.head_params + self.norm_params + self.bias_params + self.other_params

    @property
    def total_params(self) -> int:
        return self.quantized_params + self.dense_params

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def shipped_architectures() -> list[str]:
    return (
        sorted(path.name for path in ARCH_DIR.iterdir() if (path / "config.json").is_file())
        if ARCH_DIR.is_dir()
        else []
    )


def resolve_config_dir(source: str) -> Path:
    """A folder holding config.json for a model folder, an arch name, or a hub id shipped in configs/arch."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{source}: has no config.json (not a Hugging Face model folder)")
        return path
    if path.is_file() and path.name == "config.json":
        return path.parent
    if (ARCH_DIR / source / "config.json").is_file():
        return ARCH_DIR / source
    index_file = ARCH_DIR / "hub_ids.yaml"
    index = yaml.safe_load(index_file.read_text()) if index_file.is_file() else {}
    for name, hub_ids in (index or {}).items():
        if source.lower() in (hub_id.lower() for hub_id in hub_ids):
            return ARCH_DIR / name
    cached = cached_hub_config(source)
    if cached is not None:
        return cached
    raise ModelError(
        f"{source}: no local folder, shipped architecture or cached hub config of that name "
        f"(shipped: {', '.join(shipped_architectures())})"
    )


def cached_hub_config(hub_id: str) -> Optional[Path]:
    """The config.json of a hub model already in the local Hugging Face cache, never downloaded."""
    if hub_id.count("/") != 1:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(hub_id, "config.json")
    return Path(found).parent if isinstance(found, str) else None


def load_hf_config(config_dir: Path, trust_remote_code: bool = False):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(config_dir), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as error:
        raise ModelError(
            f"{config_dir}/config.json: cannot be read as a transformers config ({str(error).splitlines()[0]})"
        ) from None


def meta_skeleton(hf_config, dtype=None, trust_remote_code: bool = False):
    """The causal-LM module tree with every parameter on the meta device: shapes without memory.
    A config loaded with trust_remote_code names its model class in code beside it, which
    transformers builds only when told again."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config, dtype=dtype, trust_remote_code=trust_remote_code)


def load_architecture(source: str, trust_remote_code: bool = False) -> Architecture:
    config_dir = resolve_config_dir(source)
    hf_config = load_hf_config(config_dir, trust_remote_code)
    return describe_skeleton(meta_skeleton(hf_config, trust_remote_code=trust_remote_code), str(config_dir))


def describe_skeleton(model, source: str) -> Architecture:
    text = model.config.get_text_config()
    linears, counts = count_parameters(model)
    buffer_bytes = sum(
        buffer.numel() * buffer.element_size() for buffer in {id(b): b for b in model.buffers()}.values()
    )
    heads = text.num_attention_heads
    return Architecture(
        source=source,
        model_type=text.model_type,
        hidden=text.hidden_size,
        intermediate=text.intermediate_size,
        layers=text.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        vocab=text.vocab_size,
        max_positions=getattr(text, "max_position_embeddings", 4096),
        linears=tuple(linears),
        **counts,
        buffer_bytes=buffer_bytes,
        norms_per_layer=hidden_norms(find_decoder_layers(model)[0], text.hidden_size),
        logit_softcap=bool(getattr(text, "final_logit_softcapping", None)),
    )


def count_parameters(model) -> tuple[list[Linear], dict[str, int]]:
    """The linears, and the parameter counts of everything else by kind (Architecture's field names)."""
    import torch

    head = model.get_output_embeddings()
    embeddings = model.get_input_embeddings()
    linears, seen = [], set()
    embedding_params = head_params = norm_params = bias_params = other_params = 0
    for module_name, module in model.named_modules():
        for param_name, parameter in module.named_parameters(recurse=False):
            if id(parameter) in seen:  # tied weights are one tensor
                continue
            seen.add(id(parameter))
            count = parameter.numel()
            if module is embeddings:
                embedding_params += count
            elif module is head:
                head_params += count
            elif isinstance(module, torch.nn.Linear) and param_name == "weight":
                linears.append(Linear(module_name, module.in_features, module.out_features))
            elif isinstance(module, torch.nn.Linear):
                bias_params += count
            elif "norm" in module.__class__.__name__.lower():
                norm_params += count
            else:
                other_params += count
    return linears, {
        "embedding_params": embedding_params,
        "head_params": head_params,
        "norm_params": norm_params,
        "bias_params": bias_params,
        "other_params": other_params,
    }


def hidden_norms(layer, hidden: int) -> int:
    """The norms of one decoder layer over the hidden states (not per-head q/k norms)."""
    return sum(
        1
        for module in layer.modules()
        if "norm" in module.__class__.__name__.lower()
        and getattr(module, "weight", None) is not None
        and module.weight.numel() == hidden
    )


def find_decoder_layers(model):
    """The repeated decoder blocks: the longest ModuleList in the model."""
    import torch

    lists = [module for module in model.modules() if isinstance(module, torch.nn.ModuleList)]
    if not lists:
        raise ModelError(f"{model.__class__.__name__}: no decoder layers found")
    return max(lists, key=len)
