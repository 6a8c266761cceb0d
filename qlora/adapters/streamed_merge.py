"""Write a merged model shard by shard, reading the base's safetensors files, never the model.

Each output shard is filled from one base shard, tensor by tensor: read (safe_open, nothing else
of the checkpoint), merged as the plan says, cast to the output dtype, appended to the output file
(qlora.adapters.tensor_file) and freed. Host memory is one weight and its float32 delta, plus the
pages of the base shard being read (file cache, which the kernel can drop), whatever the model's
size; no GPU is needed: the deltas are a few small matmuls next to the reading and writing.

The arithmetic is peft's merge_and_unload, bit for bit: the base weight cast to the output dtype
(as from_pretrained(dtype=...) loads it), the delta B A * scale computed in float32 from the
adapter's tensors, added to the float32-upcast weight and rounded to the dtype once (peft's
in-place `weight += delta` on a 16-bit weight does the same); an embedding's delta is rounded to
the dtype first, as peft's Embedding.merge does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Optional

from qlora.adapters.base_files import INDEX_FILE, SINGLE_FILE, StoredTensor
from qlora.adapters.merge_plan import LoraDelta, MergePlan
from qlora.adapters.tensor_file import FLOAT_NAMES, TORCH_NAMES, TensorFileWriter, tensor_bytes


def write_merged_shards(
    layout: dict[str, StoredTensor],
    plan: MergePlan,
    adapter_file: Path,
    staging: Path,
    dtype: str,
    max_shard_bytes: int,
    round_trip: Optional[Callable] = None,
    echo: Callable[[str], None] = print,
) -> list[Path]:
    """The merged checkpoint in `staging` (safetensors shards + index when more than one);
    `round_trip(key, tensor)`: the base weight as training's NF4 saw it, or None where it was not 4-bit."""
    import torch
    from safetensors import safe_open

    output_dtype, output_name = getattr(torch, dtype), TORCH_NAMES[dtype]

    def stored_as(key: str) -> tuple[str, str, tuple[int, ...]]:
        stored = layout[key]
        return key, output_name if stored.dtype in FLOAT_NAMES else stored.dtype, stored.shape

    groups = output_groups([stored_as(key) for key in layout], layout, max_shard_bytes)
    names = [SINGLE_FILE] if len(groups) == 1 else [shard_name(i, len(groups)) for i in range(len(groups))]
    weight_map, total_bytes = {}, 0
    with safe_open(str(adapter_file), framework="pt") as adapter:
        for number, (name, entries) in enumerate(zip(names, groups), start=1):
            with (
                safe_open(str(layout[entries[0][0]].shard), framework="pt") as source,
                TensorFileWriter(staging / name, entries) as output,
            ):
                for key, _, _ in entries:
                    value = adapter.get_tensor(plan.replaced[key]) if key in plan.replaced else source.get_tensor(key)
                    if round_trip is not None and key not in plan.replaced:
                        value = round_trip(key, value)
                    output.write(key, merged_tensor(key, value, plan, adapter, output_dtype))
                    del value  # one weight in memory at a time
            total_bytes += sum(tensor_bytes(dtype_name, shape) for _, dtype_name, shape in entries)
            weight_map.update({key: name for key, _, _ in entries})
            echo(f"merged shard {number}/{len(groups)}: {name}")
    if len(groups) > 1:
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (staging / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return [staging / name for name in names]


def merged_tensor(key: str, value, plan: MergePlan, adapter, output_dtype):
    if not value.is_floating_point():
        return value
    weight = value.to(output_dtype)
    if key in plan.deltas:
        lora = plan.deltas[key]
        delta = lora_delta(adapter, lora)
        if lora.round_delta_first:
            delta = delta.to(output_dtype)
        weight = (weight.float() + delta.float()).to(output_dtype)
    if key in plan.bias_deltas:
        lora = plan.bias_deltas[key]
        weight = (weight.float() + adapter.get_tensor(lora.b_key).float() * lora.scale).to(output_dtype)
    return weight.contiguous()


def lora_delta(adapter, lora: LoraDelta):
    """scale * B A in float32 ((B A)^T where the layer stores its weight transposed): peft's
    get_delta_weight on float32 adapter weights, which is how peft loads them."""
    product = adapter.get_tensor(lora.b_key).float() @ adapter.get_tensor(lora.a_key).float()
    return (product.T if lora.transpose else product) * lora.scale


def output_groups(entries: list, layout: dict[str, StoredTensor], max_shard_bytes: int) -> list[list]:
    """The output's (name, dtype, shape) entries cut into shards of at most `max_shard_bytes` (a
    larger tensor alone), in the base's order, each inside one base shard."""
    groups: list[list] = []
    current: list = []
    size, shard = 0, None
    for entry in entries:
        key, dtype_name, shape = entry
        nbytes = tensor_bytes(dtype_name, shape)
        if current and (layout[key].shard != shard or size + nbytes > max_shard_bytes):
            groups.append(current)
            current, size = [], 0
        current.append(entry)
        size += nbytes
        shard = layout[key].shard
    if current:
        groups.append(current)
    return groups


def shard_name(index: int, count: int) -> str:
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def write_model_files(base_dir: Path, staging: Path, dtype: str) -> None:
    """config.json (the output dtype, the KV cache on: whoever loads a merged model generates)
    and the base's generation_config.json where it has one."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(base_dir))
    config.dtype = getattr(torch, dtype)
    config.use_cache = True
    config.save_pretrained(str(staging))
    if (base_dir / "generation_config.json").is_file():
        shutil.copyfile(base_dir / "generation_config.json", staging / "generation_config.json")
