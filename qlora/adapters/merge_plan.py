"""What merging an adapter does to each checkpoint tensor, worked out before anything is written.

peft names an adapter's tensors after the model's modules (`base_model.model.<module>.lora_A.weight`);
the base's checkpoint names them after its own keys (`<module>.weight`, sometimes without the
`model.` prefix, with a tied head stored once as the embedding). The plan maps one onto the
other and checks every shape from the safetensors headers, so a bad adapter is one line before a
weight is read. Each base tensor then gets one of:

- a LoRA delta, W + scale * B A (scale = alpha / r, alpha / sqrt(r) with rslora; (B A)^T with
  fan_in_fan_out and for embeddings, whose A peft stores as (r, rows));
- the adapter's full tensor in its place (modules_to_save, embeddings saved with the adapter);
- nothing: copied as it is.

Only plain LoRA is a sum of W and a low-rank product; DoRA and peft's other variants rescale or
route, and are refused with the setting's name.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from qlora.adapters.base_files import StoredTensor
from qlora.adapters.manifest import ADAPTER_WEIGHTS, read_adapter_config
from qlora.errors import ModelError

LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])\.(?P<param>weight|bias)$")
EMBEDDING_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_embedding_(?P<which>[AB])$")
FULL_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)$")
# Settings that add more than a low-rank sum; peft's own variant metadata lists most of them.
NOT_A_SUM = ("trainable_token_indices", "layer_replication", "target_parameters")


@dataclass(frozen=True)
class LoraDelta:
    module: str
    a_key: str
    b_key: str
    scale: float
    transpose: bool
    """(B A)^T: fan_in_fan_out layers (Conv1D) and embeddings."""
    round_delta_first: bool
    """peft rounds an embedding's delta to the weight's dtype before adding it; a linear's delta
    is added in float32 and the sum rounded once."""


@dataclass
class MergePlan:
    deltas: dict[str, LoraDelta] = field(default_factory=dict)
    """base weight key -> the LoRA delta added to it."""
    bias_deltas: dict[str, LoraDelta] = field(default_factory=dict)
    """base bias key -> the LoRA layer whose B bias (lora_bias) is added, scaled, to it."""
    replaced: dict[str, str] = field(default_factory=dict)
    """base key -> the adapter key whose full tensor takes its place."""


def plan_merge(adapter_dir: Path, layout: dict[str, StoredTensor], aliases: dict[str, str], prefix: str) -> MergePlan:
    """The merge of `adapter_dir` into a checkpoint of `layout`; `aliases`: tied names -> the
    name stored; `prefix`: the base model's attribute name (`model`), which some checkpoints omit."""
    from safetensors import safe_open

    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    refuse_variants(config, adapter_dir)
    with safe_open(str(adapter_dir / ADAPTER_WEIGHTS), framework="pt") as weights:
        shapes = {key: tuple(weights.get_slice(key).get_shape()) for key in weights.keys()}

    def stored(module: str, suffix: str, taken: dict) -> str:
        """The base key of `module`.`suffix`, not yet in `taken` (the plan's deltas, biases or replacements)."""
        key = base_key(f"{module}.{suffix}", layout, aliases, prefix)
        if key is None:
            raise ModelError(
                f"adapter {adapter_dir} targets {module}, which this base does not have (another architecture?)"
            )
        if key in taken:
            raise ModelError(
                f"adapter {adapter_dir} changes {key} twice ({module} is tied to it); merge one of the two adapters"
            )
        return key

    plan = MergePlan()
    for key in shapes:
        if (match := LORA_KEY.match(key)) and match["which"] == "A":
            module = match["module"]
            b_key = key.replace(".lora_A.weight", ".lora_B.weight")
            target = stored(module, "weight", plan.deltas)
            transpose = bool(config.get("fan_in_fan_out"))
            check_lora_shapes(adapter_dir, module, shapes[key], shapes.get(b_key), layout[target].shape, transpose)
            scale = lora_scale(config, module)
            plan.deltas[target] = LoraDelta(module, key, b_key, scale, transpose, round_delta_first=False)
            if f"base_model.model.{module}.lora_B.bias" in shapes:
                bias = LoraDelta(module, key, f"base_model.model.{module}.lora_B.bias", scale, False, False)
                plan.bias_deltas[stored(module, "bias", plan.bias_deltas)] = bias
        elif (match := EMBEDDING_KEY.match(key)) and match["which"] == "A":
            module = match["module"]
            b_key = f"base_model.model.{module}.lora_embedding_B"
            target = stored(module, "weight", plan.deltas)
            a_shape, b_shape = shapes[key], shapes.get(b_key)
            # peft stores an embedding's A as (r, rows) and B as (dim, r): (B A)^T is (rows, dim).
            check_lora_shapes(adapter_dir, module, a_shape, b_shape, layout[target].shape, transpose=True)
            plan.deltas[target] = LoraDelta(
                module, key, b_key, lora_scale(config, module), transpose=True, round_delta_first=True
            )
        elif LORA_KEY.match(key) or EMBEDDING_KEY.match(key):
            continue  # B: taken with its A
        elif match := FULL_KEY.match(key):
            path = match["path"].replace(".base_layer.", ".")
            module, _, suffix = path.rpartition(".")
            target = stored(module, suffix, plan.replaced)
            if target != base_key(path, layout, {}, prefix):
                raise ModelError(
                    f"adapter {adapter_dir} replaces {path}, which this base ties to {target}; "
                    "a merged model cannot keep both (untie the head before training)"
                )
            if shapes[key] != layout[target].shape:
                raise ModelError(
                    f"adapter {adapter_dir} holds {path} of shape {list(shapes[key])}, "
                    f"but this base's is {list(layout[target].shape)} (another base model?)"
                )
            plan.replaced[target] = key
        else:
            raise ModelError(f"adapter {adapter_dir}: tensor {key} is not named as peft names LoRA weights")
    return plan


def refuse_variants(config: dict, adapter_dir: Path) -> None:
    from dataclasses import fields

    from peft import LoraConfig

    for setting in fields(LoraConfig):
        value = config.get(setting.name)
        variants = setting.metadata.get("lora_variants", ())
        variant = (setting.metadata.get("is_lora_variant") and value) or (isinstance(value, str) and value in variants)
        if variant or (setting.name in NOT_A_SUM and value):
            raise ModelError(
                f"adapter {adapter_dir}: {setting.name}={value!r} is not plain LoRA (W + scale * B A); "
                "the streamed merge cannot merge it"
            )


def lora_scale(config: dict, module: str) -> float:
    """peft's scaling of `module`: its rank and alpha from rank_pattern / alpha_pattern."""
    from peft.utils.other import get_pattern_key

    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    rank = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), config["r"])
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config["lora_alpha"])
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def check_lora_shapes(adapter_dir: Path, module: str, a_shape, b_shape, weight_shape, transpose: bool) -> None:
    if b_shape is None:
        raise ModelError(f"adapter {adapter_dir}: {module} has a LoRA A but no B")
    if len(a_shape) != 2 or len(b_shape) != 2 or len(weight_shape) != 2:
        raise ModelError(f"adapter {adapter_dir}: {module} is not a linear or embedding layer; cannot merge it")
    out_size, in_size = (weight_shape[1], weight_shape[0]) if transpose else weight_shape
    if a_shape[1] != in_size or b_shape[0] != out_size or a_shape[0] != b_shape[1]:
        raise ModelError(
            f"adapter {adapter_dir} expects {module} with input size {a_shape[1]} and output size {b_shape[0]}, "
            f"but this base's is {in_size} -> {out_size} (another base model?)"
        )


def base_key(name: str, layout: dict, aliases: dict[str, str], prefix: str) -> Optional[str]:
    """The checkpoint key holding the model's parameter `name`: itself, the tensor it is tied to,
    or the same name with / without the base model's prefix."""
    # A tied name first: from_pretrained fills it from the tensor it is tied to, even where the
    # checkpoint also stores a copy under its own name.
    for candidate in (aliases.get(name), name):
        if candidate is None:
            continue
        if candidate in layout:
            return candidate
        if candidate.startswith(prefix + ".") and candidate[len(prefix) + 1 :] in layout:
            return candidate[len(prefix) + 1 :]
        if f"{prefix}.{candidate}" in layout:
            return f"{prefix}.{candidate}"
    return None
