"""Peak GPU memory and compute of a QLoRA job, from the model's shape alone: no weights, no GPU.

Every line of the breakdown is a formula over the architecture (qlora.plan.architecture) and plain settings;
each formula says why it has that form. The per-layer activation count was checked against the
tensors autograd really saves on a tiny Llama (tests/test_plan.py, exact in float32); the rest
(logits, backward temporaries, allocator slack, CUDA context) is calibrated by bench/plan_proof.py
on a GPU.

The peak of a step is reached in one of two phases that never overlap:
  loss:     every layer's checkpointed input is held while the vocab-sized logits, their
            float32 copy and log-softmax (and its gradient) exist;
  backward: one decoder layer is recomputed with its full activations, its gradients flow, and
            the 4-bit weights of a linear are dequantized to the compute dtype for the matmul.
The total is what is always resident + the larger of the two phases + allocator slack + context.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Optional, Union

from qlora.plan.architecture import Architecture, Linear
from qlora.plan.flops import FlopModel

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
NF4_BLOCK = 64  # bitsandbytes' 4-bit block: one absmax per 64 weights
NESTED_BLOCK = 256  # double quant: the absmaxes are themselves quantized in blocks of 256
OPTIMIZER_8BIT_BLOCK = 256  # bitsandbytes 8-bit optimizer state: one float32 absmax per 256 values per state
OPTIMIZER_8BIT_MIN_SIZE = 4096  # tensors smaller than this keep 32-bit state in bitsandbytes 8-bit optimizers
# Caching-allocator slack (reserved - allocated) as a share of the peak: blocks freed between
# layers are reused but not returned; a first guess, to be calibrated by bench/plan_proof.py.
ALLOCATOR_SLACK = 0.05
# CUDA context, cuBLAS workspaces and bitsandbytes kernels: memory nvidia-smi shows that torch's
# allocator never reports. ~0.5 GiB on recent cards with torch 2.x.
CUDA_CONTEXT_BYTES = 512 * 2**20
# One loss chunk's float32 logits (train.loss_chunk_tokens: auto): big enough that the head's
# matmul stays efficient, small next to a 7B model's checkpointed activations at 2k tokens.
LOSS_CHUNK_BYTES = 256 * 2**20


@dataclass(frozen=True)
class PlanSettings:
    """Plain arguments the arithmetic needs (built from a JobConfig at the edge)."""

    micro_batch: int = 1
    seq_len: int = 2048
    gradient_checkpointing: Union[bool, str] = True  # True, False or "selective" (qlora.model.checkpointing)
    grad_accum_steps: int = 1
    bits: Optional[int] = 4
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    lora_r: int = 16
    target_modules: Union[str, tuple[str, ...]] = "all-linear"
    lora_dropout: float = 0.05
    use_dora: bool = False
    optimizer: str = "paged_adamw_8bit"
    # A CUDA dropout mask is one byte per element; on CPU it has the activation's dtype.
    dropout_mask_bytes: int = 1
    loss_chunk_tokens: Union[int, str] = "auto"  # train.loss_chunk_tokens: a number, auto or off


@dataclass
class Line:
    name: str
    bytes: int
    why: str
    counted: bool = True  # False: shown for comparison, not part of the peak (the smaller phase)


@dataclass
class Plan:
    architecture: str
    settings: dict
    parameters: dict
    lines: list[Line]
    allocated_bytes: int  # peak of torch's allocator (compare with torch.cuda.max_memory_allocated)
    reserved_bytes: int  # + allocator slack (compare with torch.cuda.max_memory_reserved)
    total_bytes: int  # + CUDA context: what the card must hold
    paged_bytes: int  # paged optimizer state: in CUDA unified memory, outside torch's counters
    flops_per_token: float
    budget_bytes: Optional[int] = None
    fits: Optional[bool] = None
    suggestions: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        record = asdict(self)
        record["breakdown"] = record.pop("lines")
        return record


# --------------------------------------------------------------------------- weights


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


# --------------------------------------------------------------------------- adapters


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
                " (paged: CUDA unified memory, outside torch's allocator counters; evicted to RAM under pressure)"
                if paged
                else ""
            ),
        ),
    ]


# --------------------------------------------------------------------------- activations


# Linears that read an activation already saved by someone else (the attention output, the MLP
# product) rather than a norm output; matched by the last part of the module name.
OUTPUT_PROJECTIONS = {"o_proj", "out_proj", "dense", "down_proj", "fc2", "w2", "c_proj"}
MLP_OUTPUT_PROJECTIONS = {"down_proj", "fc2", "w2"}


def layer_activation_bytes_per_token(arch: Architecture, settings: PlanSettings) -> int:
    """Bytes autograd saves for ONE decoder layer per token (frozen 4-bit base, LoRA, SDPA/flash).

    e = compute dtype bytes; the 4-bit matmul saves no activation (its weight is frozen).
      norms          4h + 4 each: RMSNorm upcasts its input to float32 and saves it (and rsqrt)
      attention      e*(q_dim + 2 kv_dim) for rotated q, k, v + e*q_dim output + 4 B/head logsumexp
      MLP            3 e*i: gate output (for act), act(gate) and up output (for their product)
      LoRA inputs    without dropout: e*h per norm output feeding targets (q/k/v share one, gate/up
                     another), + e*i for down_proj's input (the product); o_proj's input is the
                     attention output, saved anyway. With dropout every target saves its own dropped
                     copy and mask instead: (e + mask bytes) * in_features
      LoRA A outputs e*r per target, saved by B
    """
    e = DTYPE_BYTES[settings.compute_dtype]
    h, i = arch.hidden, arch.intermediate
    in_layer = set(layer_linears(arch))
    targets = [linear for linear in lora_targets(arch, settings.target_modules) if linear in in_layer]
    norms = arch.norms_per_layer * (4 * h + 4)
    attention = e * (2 * arch.q_dim + 2 * arch.kv_dim) + 4 * arch.heads
    mlp = 3 * e * i
    if settings.lora_dropout > 0:
        lora_inputs = sum((e + settings.dropout_mask_bytes) * linear.in_features for linear in targets)
    else:
        short = lambda linear: linear.name.rsplit(".", 1)[-1]  # noqa: E731
        norm_fed = {linear.name.rsplit(".", 1)[0] for linear in targets if short(linear) not in OUTPUT_PROJECTIONS}
        products = [linear for linear in targets if short(linear) in MLP_OUTPUT_PROJECTIONS]
        lora_inputs = e * h * len(norm_fed) + sum(e * linear.in_features for linear in products)
    lora_outputs = e * settings.lora_r * len(targets)
    return norms + lora_inputs + lora_outputs + attention + mlp


def layer_linears(arch: Architecture) -> list[Linear]:
    """The linears of the first decoder layer (all layers are alike)."""
    prefix = arch.linears[0].name.rsplit(".", 2)[0] if arch.linears else ""
    return [linear for linear in arch.linears if linear.name.startswith(prefix + ".")]


def activation_lines(arch: Architecture, settings: PlanSettings) -> tuple[list[Line], list[Line], list[Line]]:
    """(always held during the step, loss phase, backward phase)."""
    e = DTYPE_BYTES[settings.compute_dtype]
    tokens = settings.micro_batch * settings.seq_len
    per_layer = layer_activation_bytes_per_token(arch, settings)
    final_norm = 4 * arch.hidden + 4
    rope = 2 * e * arch.head_dim  # cos and sin per position, shared by every layer
    shape = f"{settings.micro_batch} x {settings.seq_len} tokens"
    if settings.gradient_checkpointing == "selective":
        kept = arch.hidden + sum(linear.out_features for linear in layer_linears(arch))
        held = Line(
            "activations",
            (arch.layers * e * kept + final_norm) * tokens,
            f"selective checkpointing: each of {arch.layers} layers keeps its input and its 4-bit linears' outputs, "
            f"{e}*{kept:,} B/token ({shape})",
        )
    elif settings.gradient_checkpointing:
        # The rotary tables the checkpoints hold as inputs are ignored here: 2*e*head_dim per position.
        held = Line(
            "activations",
            (arch.layers * e * arch.hidden + final_norm) * tokens,
            f"checkpointing: each of {arch.layers} layers keeps only its input, {e}*hidden B/token ({shape})",
        )
    else:
        held = Line(
            "activations",
            (arch.layers * per_layer + final_norm + rope) * tokens,
            f"no checkpointing: {arch.layers} layers x {per_layer / 1024:.0f} KiB/token saved for backward ({shape})",
        )
    # Loss: bf16 logits -> float32 copy -> log-softmax (saved) -> in backward its gradient and the
    # NLL gradient: three float32 vocab-sized tensors at once, for one chunk of supervised
    # positions (qlora.training.loss); a softcapped head's logits are the model's own, all at once.
    logits_per_token = 12 * arch.vocab + (2 * e * arch.vocab if arch.logit_softcap else 0)
    chunk = None if arch.logit_softcap else loss_chunk_tokens(arch.vocab, settings.loss_chunk_tokens)
    logit_tokens = tokens if chunk is None else min(tokens, chunk)
    where = (
        f"a chunk of {logit_tokens:,} supervised positions"
        if logit_tokens < tokens
        else f"{shape}; the loop computes logits only at supervised positions, so this is the bound for train_on: all"
    )
    loss = Line(
        "logits_and_loss",
        logits_per_token * logit_tokens,
        f"{arch.vocab:,}-entry logits: 3 float32 copies at once in the loss backward ({where})",
    )
    # Backward through one layer: its recomputed activations (with checkpointing) + gradients of
    # the hidden states in and out and of the two MLP intermediates.
    temporaries = e * (2 * arch.hidden + 2 * arch.intermediate)
    recompute = per_layer if settings.gradient_checkpointing else 0
    backward = [
        Line(
            "layer_backward",
            (recompute + temporaries) * tokens,
            ("one layer recomputed (%.0f KiB/token) + " % (per_layer / 1024) if recompute else "")
            + "gradients of its hidden states and MLP intermediates",
        )
    ]
    if settings.bits in (4, 8) and arch.linears:
        biggest = max(arch.linears, key=lambda linear: linear.weights)
        backward.append(
            Line(
                "dequant_workspace",
                biggest.weights * e,
                f"the largest linear ({biggest.name.rsplit('.', 1)[-1]}, "
                f"{biggest.out_features}x{biggest.in_features}) dequantized to {settings.compute_dtype} for its matmul",
            )
        )
    return [held], [loss], backward


def loss_chunk_tokens(vocab: int, setting: Union[int, str] = "auto") -> Optional[int]:
    """Supervised positions whose logits the loss computes at once (train.loss_chunk_tokens):
    the setting when a number; None when off (all of a micro-batch's at once); auto: as many
    as keep one chunk's float32 logits within LOSS_CHUNK_BYTES (Llama 3's 128k vocabulary: 523)."""
    if setting == "off":
        return None
    if setting == "auto":
        return max(1, LOSS_CHUNK_BYTES // (4 * vocab))
    return int(setting)


# --------------------------------------------------------------------------- the plan


def flops_per_token(arch: Architecture, settings: PlanSettings) -> float:
    """Training FLOPs per token of full seq_len rows (qlora.plan.flops: useful FLOPs + the forward
    that checkpointing recomputes); the loop's MFU counts the useful part by the same model."""
    return FlopModel.of(arch, sum(lora_tensor_sizes(arch, settings))).per_token(
        settings.seq_len, settings.gradient_checkpointing
    )


def make_plan(
    arch: Architecture, settings: PlanSettings, budget_bytes: Optional[int] = None, suggest: bool = True
) -> Plan:
    static = base_weight_lines(arch, settings) + adapter_lines(arch, settings)
    held, loss, backward = activation_lines(arch, settings)
    loss_bytes, backward_bytes = sum(line.bytes for line in loss), sum(line.bytes for line in backward)
    for line in loss if loss_bytes < backward_bytes else backward:
        line.counted = False
        line.why += " [smaller phase: not part of the peak]"
    lines = static + held + loss + backward
    paged = (
        next(line.bytes for line in static if line.name == "optimizer_state")
        if settings.optimizer.startswith("paged")
        else 0
    )
    allocated = sum(line.bytes for line in lines if line.counted) - paged
    slack = int(ALLOCATOR_SLACK * allocated)
    lines.append(
        Line(
            "allocator_slack",
            slack,
            f"caching allocator: reserved beyond allocated, ~{ALLOCATOR_SLACK:.0%} of the peak",
        )
    )
    lines.append(
        Line(
            "cuda_context", CUDA_CONTEXT_BYTES, "CUDA context + cuBLAS workspace + kernels (outside torch's allocator)"
        )
    )
    plan = Plan(
        architecture=arch.source,
        settings=asdict(settings),
        parameters={
            "total": arch.total_params,
            "quantized": arch.quantized_params,
            "dense": arch.dense_params,
            "lora": sum(lora_tensor_sizes(arch, settings)),
        },
        lines=lines,
        allocated_bytes=allocated,
        reserved_bytes=allocated + slack,
        total_bytes=allocated + slack + CUDA_CONTEXT_BYTES + paged,
        paged_bytes=paged,
        flops_per_token=flops_per_token(arch, settings),
        budget_bytes=budget_bytes,
    )
    if budget_bytes is not None:
        plan.fits = plan.total_bytes <= budget_bytes
        if suggest:
            plan.suggestions = suggestions(arch, settings, budget_bytes)
    return plan


def fits(arch: Architecture, settings: PlanSettings, budget_bytes: int) -> bool:
    return make_plan(arch, settings, budget_bytes, suggest=False).fits


def largest_micro_batch(arch: Architecture, settings: PlanSettings, budget_bytes: int, limit: int = 1024) -> int:
    """The largest micro-batch at settings.seq_len that fits (0 if not even one sequence does)."""
    return largest_fitting(lambda value: fits(arch, replace(settings, micro_batch=value), budget_bytes), 1, limit)


def largest_seq_len(arch: Architecture, settings: PlanSettings, budget_bytes: int, step: int = 128) -> int:
    """The largest multiple of `step` up to the model's context that fits at settings.micro_batch."""
    steps = largest_fitting(
        lambda value: fits(arch, replace(settings, seq_len=value * step), budget_bytes),
        1,
        max(1, arch.max_positions // step),
    )
    return steps * step


def largest_fitting(test, low: int, high: int) -> int:
    """Binary search for the largest value in [low, high] passing a monotone test (0 if none)."""
    if not test(low):
        return 0
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if test(middle) else (low, middle - 1)
    return low


def suggestions(arch: Architecture, settings: PlanSettings, budget_bytes: int) -> dict:
    without = replace(settings, gradient_checkpointing=False)
    found = {
        "largest_micro_batch": largest_micro_batch(arch, settings, budget_bytes),
        "largest_seq_len": largest_seq_len(arch, settings, budget_bytes),
        "fits_without_checkpointing": fits(arch, without, budget_bytes),
        "largest_micro_batch_without_checkpointing": largest_micro_batch(arch, without, budget_bytes),
    }
    if settings.bits == 4:  # selective checkpointing keeps 4-bit matmul outputs only
        found["fits_with_selective_checkpointing"] = fits(
            arch, replace(settings, gradient_checkpointing="selective"), budget_bytes
        )
    return found


def seconds_per_token(flops: float, tflops: float, utilization: float) -> float:
    return flops / (tflops * 1e12 * utilization)


# --------------------------------------------------------------------------- edge: job config in


def settings_from_job(config, micro_batch: Optional[int] = None) -> PlanSettings:
    """PlanSettings from a JobConfig (micro_batch overrides train.micro_batch_size, e.g. when it is auto)."""
    train, lora, quant = config.train, config.lora, config.quantization
    batch = (
        micro_batch
        if micro_batch is not None
        else (train.micro_batch_size if isinstance(train.micro_batch_size, int) else 1)
    )
    return PlanSettings(
        micro_batch=batch,
        seq_len=config.data.max_seq_len,
        gradient_checkpointing=train.gradient_checkpointing,
        grad_accum_steps=train.grad_accum_steps,
        bits=quant.bits,
        double_quant=quant.double_quant,
        compute_dtype=quant.compute_dtype,
        lora_r=lora.r,
        target_modules=lora.target_modules if isinstance(lora.target_modules, str) else tuple(lora.target_modules),
        lora_dropout=lora.dropout,
        use_dora=lora.use_dora,
        optimizer=train.optimizer,
        loss_chunk_tokens=train.loss_chunk_tokens,
    )
