"""What is resident on ONE of N GPUs (train.distributed): DDP adds gradient buckets, FSDP divides.

Every rank runs a whole micro-batch of its own, so activations, the loss phase and the backward
phase are those of one GPU whatever N is; only the resident lines (qlora.plan.weights) change.

DDP replicates everything and its reducer keeps a flat copy of the trainable gradients in
buckets for the all-reduce (bucket_cap_mb 25 sets how many buckets, not their sum; torch's default
gradient_as_bucket_view=False keeps .grad separate from the buckets): the LoRA gradients once more.

FSDP (FSDP1, FULL_SHARD) as FSDP-QLoRA wraps it: one unit per decoder layer, the LoRA weights in
their own small units (so no frozen flat parameter carries a gradient), the embeddings, final norm
and head in the root unit. Per GPU that is
  shards      1/N of every flat parameter: the packed 4-bit codes, the 16-bit dense weights, the
              LoRA weights, their gradients and the optimizer state (which steps on the shards);
  replicated  the 4-bit quantization statistics (absmax, nested absmax, code tables): bitsandbytes
              keeps them in the weight's quant_state, not in a parameter FSDP can flatten; buffers;
  gathered    the root unit, unsharded from the first forward to the end of the backward (FSDP1
              never reshards the root after its forward: the backward starts there), and TWO
              decoder layers unsharded at once: the one computing and the next one prefetched
              (forward prefetch and backward_prefetch BACKWARD_PRE), with their LoRA weights;
              plus one layer's full LoRA gradients before their reduce-scatter.
Padding of the flat parameters to a multiple of N (under N elements each) is left out.
"""

from __future__ import annotations

import math

from qlora.plan.activations import layer_linears
from qlora.plan.architecture import Architecture
from qlora.plan.settings import DTYPE_BYTES, Line, PlanSettings
from qlora.plan.weights import lora_targets, lora_tensor_sizes

# FSDP1 holds the computing layer's unsharded parameters and the prefetched next one's.
GATHERED_LAYERS = 2
# Sizes `qlora plan` tries when a job does not fit: one node of up to 8, then whole nodes.
GPU_COUNTS = (2, 4, 8, 16, 32, 64)
SHARDED_LINES = ("base_dense_weights", "lora_weights", "lora_grads", "optimizer_state")


def per_gpu_lines(arch: Architecture, settings: PlanSettings, resident: list[Line]) -> list[Line]:
    """The resident lines on one of settings.world_size GPUs (unchanged on one)."""
    if settings.world_size == 1:
        return resident
    if settings.strategy == "ddp":
        return resident + [ddp_bucket_line(arch, settings)]
    if settings.bits == 8:
        # The job schema refuses this combination; a PlanSettings built by hand meets it here.
        raise ValueError("fsdp shards 4-bit or 16-bit bases; an 8-bit base cannot be sharded")
    return fsdp_lines(arch, settings, resident)


def ddp_bucket_line(arch: Architecture, settings: PlanSettings) -> Line:
    lora_params = sum(lora_tensor_sizes(arch, settings))
    return Line(
        "ddp_grad_buckets",
        lora_params * 4,
        "DDP's reducer: a flat float32 copy of the LoRA gradients in all-reduce buckets (bucket_cap_mb 25)",
    )


def shard(total: int, world_size: int) -> int:
    return math.ceil(total / world_size)


def quantized_code_bytes(arch: Architecture, settings: PlanSettings, linears) -> int:
    """The part of the base's linear weights FSDP flattens: packed 4-bit codes, or the 16-bit weights."""
    if settings.bits == 4:
        return sum(math.ceil(linear.weights / 2) for linear in linears)
    return sum(linear.weights for linear in linears) * DTYPE_BYTES[settings.compute_dtype]


def root_dense_params(arch: Architecture) -> int:
    """The root unit's parameters: embeddings, head and the final norm (hidden weights)."""
    return arch.embedding_params + arch.head_params + arch.hidden


def layer_unit_bytes(arch: Architecture, settings: PlanSettings) -> int:
    """One decoder layer's unsharded parameters: its linears' codes, its norms and biases, its LoRA weights."""
    linears = layer_linears(arch)
    dense = (arch.dense_params - root_dense_params(arch)) // max(arch.layers, 1)
    return (
        quantized_code_bytes(arch, settings, linears)
        + dense * DTYPE_BYTES[settings.compute_dtype]
        + layer_lora_params(arch, settings) * 4
    )


def layer_lora_params(arch: Architecture, settings: PlanSettings) -> int:
    """LoRA parameters of one decoder layer: A (r x in) and B (out x r) per target, + DoRA's magnitude."""
    in_layer = set(layer_linears(arch))
    return sum(
        settings.lora_r * (linear.in_features + linear.out_features) + (linear.out_features if settings.use_dora else 0)
        for linear in lora_targets(arch, settings.target_modules)
        if linear in in_layer
    )


def fsdp_lines(arch: Architecture, settings: PlanSettings, resident: list[Line]) -> list[Line]:
    world = settings.world_size
    lines = []
    for line in resident:
        if line.name == "base_linear_weights":
            codes = quantized_code_bytes(arch, settings, arch.linears)
            statistics = line.bytes - codes
            kept = f" + {statistics / 2**20:,.0f} MiB quantization statistics on every GPU" if statistics else ""
            lines.append(Line(line.name, shard(codes, world) + statistics, f"1/{world} of {line.why}{kept}"))
        elif line.name == "base_dense_weights":
            sharded = line.bytes - arch.buffer_bytes
            lines.append(Line(line.name, shard(sharded, world) + arch.buffer_bytes, f"1/{world} shard: {line.why}"))
        elif line.name in SHARDED_LINES:
            lines.append(Line(line.name, shard(line.bytes, world), f"1/{world} shard: {line.why}"))
        else:
            lines.append(line)
    e = DTYPE_BYTES[settings.compute_dtype]
    lines += [
        Line(
            "fsdp_gathered_root",
            root_dense_params(arch) * e,
            "root unit (embeddings, final norm, lm_head) unsharded from the forward to the end of the backward",
        ),
        Line(
            "fsdp_gathered_layers",
            GATHERED_LAYERS * layer_unit_bytes(arch, settings),
            f"{GATHERED_LAYERS} decoder layers unsharded at once (the one computing + the one prefetched), "
            "4-bit codes, norms and LoRA weights",
        ),
        Line(
            "fsdp_layer_grads",
            layer_lora_params(arch, settings) * 4,
            "one layer's float32 LoRA gradients unsharded, before their reduce-scatter",
        ),
    ]
    return lines


def strategies_to_try(settings: PlanSettings) -> list[tuple[int, str]]:
    """(gpus, strategy) pairs beyond the one planned, fewest GPUs first; ddp before fsdp at equal
    count (no all-gathers); no fsdp for an 8-bit base."""
    strategies = ("ddp",) if settings.bits == 8 else ("ddp", "fsdp")
    counts = sorted({count for count in (settings.world_size, *GPU_COUNTS) if count >= max(2, settings.world_size)})
    return [
        (count, strategy)
        for count in counts
        for strategy in strategies
        if (count, strategy) != (settings.world_size, settings.strategy)
    ]
