"""What a step adds on top: the activations checkpointing keeps per layer, the loss phase (the
vocabulary-sized logits of one chunk) and the backward phase (one layer recomputed with its
gradients and a dequantized weight). The per-layer count was checked against the tensors
autograd really saves on a tiny Llama (tests/test_plan.py, exact in float32)."""

from __future__ import annotations

from qlora.plan.architecture import Architecture, Linear
from qlora.plan.loss_chunks import loss_chunk_tokens
from qlora.plan.settings import DTYPE_BYTES, Line, PlanSettings
from qlora.plan.weights import lora_targets

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
      LoRA inputs    e*h per norm output feeding targets (q/k/v share one, gate/up another), + e*i
                     for down_proj's input (the product); o_proj's input is the attention output,
                     saved anyway (qlora.adapters.lean_lora keeps each input once, in e). With
                     dropout + 1 B of bool mask per target input element. Under FSDP, peft's own
                     forward: every target saves its own dropped copy and mask instead,
                     (e + mask bytes) * in_features
      LoRA A outputs e*r per target
    """
    e = DTYPE_BYTES[settings.compute_dtype]
    h, i = arch.hidden, arch.intermediate
    in_layer = set(layer_linears(arch))
    targets = [linear for linear in lora_targets(arch, settings.target_modules) if linear in in_layer]
    norms = arch.norms_per_layer * (4 * h + 4)
    attention = e * (2 * arch.q_dim + 2 * arch.kv_dim) + 4 * arch.heads
    mlp = 3 * e * i
    if settings.lora_dropout > 0 and settings.strategy == "fsdp" and settings.world_size > 1:
        lora_inputs = sum((e + settings.dropout_mask_bytes) * linear.in_features for linear in targets)
    else:
        short = lambda linear: linear.name.rsplit(".", 1)[-1]  # noqa: E731
        norm_fed = {linear.name.rsplit(".", 1)[0] for linear in targets if short(linear) not in OUTPUT_PROJECTIONS}
        products = [linear for linear in targets if short(linear) in MLP_OUTPUT_PROJECTIONS]
        lora_inputs = e * h * len(norm_fed) + sum(e * linear.in_features for linear in products)
        if settings.lora_dropout > 0:
            lora_inputs += sum(linear.in_features for linear in targets)  # the bool masks
    lora_outputs = e * settings.lora_r * len(targets)
    return norms + lora_inputs + lora_outputs + attention + mlp


def layer_linears(arch: Architecture) -> list[Linear]:
    """The linears of the first decoder layer (all layers are alike)."""
    prefix = arch.linears[0].name.rsplit(".", 2)[0] if arch.linears else ""
    return [linear for linear in arch.linears if linear.name.startswith(prefix + ".")]


def activation_lines(arch: Architecture, settings: PlanSettings) -> tuple[list[Line], list[Line], list[Line]]:
    """(always held during the step, loss phase, backward phase)."""
    tokens = settings.micro_batch * settings.seq_len
    per_layer = layer_activation_bytes_per_token(arch, settings)
    held = held_activations_line(arch, settings, per_layer, tokens)
    loss = loss_line(arch, settings, tokens)
    return [held], [loss], backward_lines(arch, settings, per_layer, tokens)


def batch_shape(settings: PlanSettings) -> str:
    return f"{settings.micro_batch} x {settings.seq_len} tokens"


def held_activations_line(arch: Architecture, settings: PlanSettings, per_layer: int, tokens: int) -> Line:
    """What every layer keeps from its forward until its backward, per checkpointing mode."""
    e = DTYPE_BYTES[settings.compute_dtype]
    final_norm = 4 * arch.hidden + 4
    rope = 2 * e * arch.head_dim  # cos and sin per position, shared by every layer
    shape = batch_shape(settings)
    if settings.gradient_checkpointing == "selective":
        kept = arch.hidden + sum(linear.out_features for linear in layer_linears(arch))
        return Line(
            "activations",
            (arch.layers * e * kept + final_norm) * tokens,
            f"selective checkpointing: each of {arch.layers} layers keeps its input and its 4-bit linears' outputs, "
            f"{e}*{kept:,} B/token ({shape})",
        )
    if settings.gradient_checkpointing:
        # The rotary tables the checkpoints hold as inputs are ignored here: 2*e*head_dim per position.
        return Line(
            "activations",
            (arch.layers * e * arch.hidden + final_norm) * tokens,
            f"checkpointing: each of {arch.layers} layers keeps only its input, {e}*hidden B/token ({shape})",
        )
    return Line(
        "activations",
        (arch.layers * per_layer + final_norm + rope) * tokens,
        f"no checkpointing: {arch.layers} layers x {per_layer / 1024:.0f} KiB/token saved for backward ({shape})",
    )


def loss_line(arch: Architecture, settings: PlanSettings, tokens: int) -> Line:
    # Loss: bf16 logits -> float32 copy -> log-softmax (saved) -> in backward its gradient and the
    # NLL gradient: three float32 vocab-sized tensors at once, for one chunk of supervised
    # positions (qlora.training.loss); a softcapped head's logits are the model's own, all at once.
    e = DTYPE_BYTES[settings.compute_dtype]
    logits_per_token = 12 * arch.vocab + (2 * e * arch.vocab if arch.logit_softcap else 0)
    chunk = None if arch.logit_softcap else loss_chunk_tokens(arch.vocab, settings.loss_chunk_tokens)
    logit_tokens = tokens if chunk is None else min(tokens, chunk)
    shape = batch_shape(settings)
    where = (
        f"a chunk of {logit_tokens:,} supervised positions"
        if logit_tokens < tokens
        else f"{shape}; the loop computes logits only at supervised positions, so this is the bound for train_on: all"
    )
    return Line(
        "logits_and_loss",
        logits_per_token * logit_tokens,
        f"{arch.vocab:,}-entry logits: 3 float32 copies at once in the loss backward ({where})",
    )


def backward_lines(arch: Architecture, settings: PlanSettings, per_layer: int, tokens: int) -> list[Line]:
    # Backward through one layer: its recomputed activations (with checkpointing) + gradients of
    # the hidden states in and out and of the two MLP intermediates.
    e = DTYPE_BYTES[settings.compute_dtype]
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
    return backward
