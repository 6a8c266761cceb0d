"""What a step adds on top: the activations checkpointing keeps per layer, the loss phase (the
vocabulary-sized logits of one chunk), the backward phase (one layer recomputed with its
gradients and a dequantized weight) and, for DPO, the reference phase (the same model with the
adapter off, under no_grad, between the policy's forward and its backward). The per-layer count
was checked against the tensors autograd really saves on a tiny Llama (tests/test_plan.py, exact
in float32; tests/test_preference_plan.py for a DPO step).

A micro-batch row is `sequences_per_row` sequences of up to seq_len tokens: one for SFT, a pair's
chosen and rejected for DPO / ORPO (one padding-free forward of 2 x micro_batch sequences), so a
micro-batch of P pairs holds the tokens, activations and logits of 2P SFT rows."""

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


def micro_batch_tokens(settings: PlanSettings) -> int:
    """Tokens of one micro-batch of full rows: every sequence of every row at seq_len."""
    return settings.micro_batch * settings.sequences_per_row * settings.seq_len


def activation_lines(arch: Architecture, settings: PlanSettings) -> tuple[list[Line], list[list[Line]]]:
    """(always held during the step, [the phases that never overlap: loss, backward, and DPO's
    reference forward]); the step's peak is the held lines + its largest phase."""
    tokens = micro_batch_tokens(settings)
    per_layer = layer_activation_bytes_per_token(arch, settings)
    held = held_activations_line(arch, settings, per_layer, tokens)
    phases = [[loss_line(arch, settings, tokens)], backward_lines(arch, settings, per_layer, tokens)]
    if settings.reference_forward:
        phases.append([reference_line(arch, settings, tokens)])
    return [held], phases


def batch_shape(settings: PlanSettings) -> str:
    if settings.sequences_per_row == 1:
        return f"{settings.micro_batch} x {settings.seq_len} tokens"
    pairs = f"{settings.micro_batch} pair" + ("s" if settings.micro_batch != 1 else "")
    return f"{pairs} x {settings.sequences_per_row} sequences (chosen, rejected) x {settings.seq_len} tokens"


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


def chunk_positions(arch: Architecture, settings: PlanSettings, tokens: int) -> int:
    """Positions whose vocabulary-sized logits exist at once: one loss chunk's (qlora.plan.loss_chunks),
    or all of them for a softcapped head, whose logits are the model's own."""
    chunk = None if arch.logit_softcap else loss_chunk_tokens(arch.vocab, settings.loss_chunk_tokens)
    return tokens if chunk is None else min(tokens, chunk)


def loss_line(arch: Architecture, settings: PlanSettings, tokens: int) -> Line:
    # Loss: bf16 logits -> float32 copy -> log-softmax (saved) -> in backward its gradient and the
    # NLL gradient: three float32 vocab-sized tensors at once, for one chunk of supervised
    # positions (qlora.training.loss); a softcapped head's logits are the model's own, all at once.
    e = DTYPE_BYTES[settings.compute_dtype]
    logits_per_token = 12 * arch.vocab + (2 * e * arch.vocab if arch.logit_softcap else 0)
    logit_tokens = chunk_positions(arch, settings, tokens)
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


def layer_forward_bytes_per_token(arch: Architecture, settings: PlanSettings) -> int:
    """Bytes a decoder layer's forward holds at once per token when autograd saves nothing (under
    no_grad): four hidden-sized tensors (the embeddings, which the model's forward keeps to its
    end; the layer's input, held by its caller; the residual after attention; the normed input),
    the rotary cos and sin, and the larger of the attention's q, k, v, rotated q and k and output,
    and the MLP's act(gate), up and their product (gate is freed once activated). No LoRA: DPO's
    reference runs with the adapter off. Measured on a tiny Llama within 1% (tests/test_preference_plan.py)."""
    e = DTYPE_BYTES[settings.compute_dtype]
    attention = 3 * arch.q_dim + 3 * arch.kv_dim
    mlp = 3 * arch.intermediate
    return e * (4 * arch.hidden + 2 * arch.head_dim + max(attention, mlp))


def reference_line(arch: Architecture, settings: PlanSettings, tokens: int) -> Line:
    # DPO's reference forward (qlora.training.preference) runs after the policy's forward, every
    # layer's held activations still there, and before its backward; under no_grad it saves
    # nothing, so its peak is a moment: one layer running (its working set + the dequantized
    # weight of its largest linear) or, after the layers, the head on one loss chunk (float32
    # logits and their log-softmax, no backward copy). Never both: the layers are done first.
    # Throughout, the policy's last loss chunk (never checkpointed) keeps its float32 log-softmax
    # for the backward to come.
    e = DTYPE_BYTES[settings.compute_dtype]
    layer = layer_forward_bytes_per_token(arch, settings) * tokens
    if settings.bits in (4, 8) and arch.linears:
        layer += max(linear.weights for linear in arch.linears) * e
    logit_tokens = chunk_positions(arch, settings, tokens)
    head = (8 * arch.vocab + (2 * e * arch.vocab if arch.logit_softcap else 0)) * logit_tokens
    policy_chunk = 4 * arch.vocab * logit_tokens
    moment = (
        f"one layer's forward ({layer_forward_bytes_per_token(arch, settings) / 1024:.0f} KiB/token"
        + (" + a dequantized linear" if settings.bits in (4, 8) else "")
        + ")"
        if layer >= head
        else f"the head on {logit_tokens:,} positions (float32 logits + log-softmax)"
    )
    return Line(
        "reference_forward",
        max(layer, head) + policy_chunk,
        f"DPO's reference (adapter off, no_grad: nothing saved) between the policy's forward and backward: "
        f"its peak is {moment}, + the policy's last loss chunk's log-softmax ({batch_shape(settings)})",
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
