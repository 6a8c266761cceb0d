"""What is resident for the whole run: the base's weights (NF4 with its absmaxes, 8-bit or
16-bit), the LoRA weights, their gradients and the optimizer state."""

from __future__ import annotations

import math

from qlora.plan.architecture import Architecture, Linear
from qlora.plan.settings import DTYPE_BYTES, Line, PlanSettings

NF4_BLOCK = 64  # bitsandbytes' 4-bit block: one absmax per 64 weights
NESTED_BLOCK = 256  # double quant: the absmaxes are themselves quantized in blocks of 256
OPTIMIZER_8BIT_BLOCK = 256  # bitsandbytes 8-bit optimizer state: one float32 absmax per 256 values per state
OPTIMIZER_8BIT_MIN_SIZE = 4096  # tensors smaller than this keep 32-bit state in bitsandbytes 8-bit optimizers


def nf4_bytes(weights: int, double_quant: bool) -> int:
    """Packed 4-bit weights (two per byte) + the block absmaxes of one quantized linear.

    Single quant: a float32 absmax per 64 weights = 0.5 bit/weight -> 4.5 bits.
    Double quant: uint8 absmaxes + a float32 absmax per 256 of them + a float32 offset and the
    256-entry float32 code of the second level -> 4 + 8/64 + 32/(64*256) = ~4.127 bits.
    The 16-entry float32 NF4 code comes with every linear either way.
    """
    blocks = math.ceil(weights / NF4_BLOCK)
    code = 16 * 4
    if not double_quant:
        return math.ceil(weights / 2) + blocks * 4 + code
    return math.ceil(weights / 2) + blocks + math.ceil(blocks / NESTED_BLOCK) * 4 + 4 + 256 * 4 + code


def base_weight_lines(arch: Architecture, settings: PlanSettings) -> list[Line]:
    dense_bytes = DTYPE_BYTES[settings.compute_dtype]
    if settings.bits == 4:
        quantized = sum(nf4_bytes(linear.weights, settings.double_quant) for linear in arch.linears)
        bits = 8 * quantized / max(arch.quantized_params, 1)
        what = f"NF4{' + double quant' if settings.double_quant else ''}"
        why = (
            f"{arch.quantized_params / 1e9:.2f}B linear weights x {bits:.3f} bits "
            f"({what}: 4-bit codes + absmax per {NF4_BLOCK})"
        )
    elif settings.bits == 8:
        quantized = arch.quantized_params + sum(linear.out_features * 4 for linear in arch.linears)
        why = f"{arch.quantized_params / 1e9:.2f}B linear weights in int8 + a float32 scale per row (LLM.int8)"
    else:
        quantized = arch.quantized_params * dense_bytes
        why = f"{arch.quantized_params / 1e9:.2f}B linear weights unquantized in {settings.compute_dtype}"
    parts = [f"embeddings {arch.embedding_params / 1e6:.0f}M"]
    parts.append(f"lm_head {arch.head_params / 1e6:.0f}M" if arch.head_params else "lm_head tied to the embeddings")
    parts.append(f"norms+biases {(arch.norm_params + arch.bias_params + arch.other_params) / 1e6:.2f}M")
    return [
        Line("base_linear_weights", quantized, why),
        Line(
            "base_dense_weights",
            arch.dense_params * dense_bytes + arch.buffer_bytes,
            f"kept in {settings.compute_dtype} ({dense_bytes} B/param): " + ", ".join(parts),
        ),
    ]


def lora_targets(arch: Architecture, target_modules) -> list[Linear]:
    """peft's matching: all-linear is every linear but the output head; names match the last path parts."""
    if target_modules == "all-linear":
        return list(arch.linears)
    names = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    return [
        linear
        for linear in arch.linears
        if any(linear.name == name or linear.name.endswith("." + name) for name in names)
    ]


def lora_tensor_sizes(arch: Architecture, settings: PlanSettings) -> list[int]:
    """Element counts of every trainable tensor: A (r x in) and B (out x r) per target (+ DoRA's magnitude)."""
    sizes = []
    for linear in lora_targets(arch, settings.target_modules):
        sizes += [settings.lora_r * linear.in_features, linear.out_features * settings.lora_r]
        if settings.use_dora:
            sizes.append(linear.out_features)
    return sizes


# bitsandbytes/optim/optimizer.py get_state_buffer: `if not self.is_paged or A.numel() < 1e5`.
PAGED_MIN_SIZE = 100_000


def optimizer_state_bytes(sizes: list[int], optimizer: str) -> int:
    """AdamW keeps two moments per parameter: float32 (8 B) for torch AdamW; uint8 (2 B) plus a
    float32 absmax per 256 values per moment for bitsandbytes 8-bit, which keeps 32-bit state for
    tensors under 4096 elements and a 256-entry float32 quantization map per moment."""
    if optimizer == "adamw":
        return sum(sizes) * 8
    total = 0
    for size in sizes:
        if size < OPTIMIZER_8BIT_MIN_SIZE:
            total += size * 8
        else:
            total += size * 2 + 2 * math.ceil(size / OPTIMIZER_8BIT_BLOCK) * 4 + 2 * 256 * 4
    return total


def paged_state_bytes(arch: Architecture, settings: PlanSettings) -> int:
    """The optimizer state a paged optimizer really pages: bitsandbytes' get_state_buffer pages
    the moments of tensors of at least PAGED_MIN_SIZE elements and allocates the rest as ordinary
    device tensors (at r=16 about half of Llama-3.1-8B's LoRA state, nearly all of a 70B's)."""
    if not settings.optimizer.startswith("paged"):
        return 0
    sizes = [size for size in lora_tensor_sizes(arch, settings) if size >= PAGED_MIN_SIZE]
    return optimizer_state_bytes(sizes, settings.optimizer)


def adapter_lines(arch: Architecture, settings: PlanSettings) -> list[Line]:
    sizes = lora_tensor_sizes(arch, settings)
    count = sum(sizes)
    targets = len(lora_targets(arch, settings.target_modules))
    paged = settings.optimizer.startswith("paged")
    state = optimizer_state_bytes(sizes, settings.optimizer)
    return [
        Line(
            "lora_weights",
            count * 4,
            f"{count / 1e6:.1f}M LoRA params (r={settings.lora_r} on {targets} linears) in float32",
        ),
        Line(
            "lora_grads",
            count * 4,
            "float32 gradients of the LoRA params, alive from the first backward to the optimizer step",
        ),
        Line(
            "optimizer_state",
            state,
            f"{settings.optimizer}: two moments per LoRA param"
            + (
                " (paged for tensors of 100k+ values: CUDA unified memory, outside torch's allocator counters;"
                " evicted to RAM under pressure)"
                if paged
                else ""
            ),
        ),
    ]
