"""FLOPs of a QLoRA training step, from the architecture alone: ONE formula for `qlora plan`
(time estimates) and the loop (MFU).

Useful FLOPs (what MFU counts) are the matmul FLOPs a step cannot do without, per real
(non-padding) token of a row of length L:
  frozen base linears W  forward 2W + input gradients 2W (no weight gradients: frozen)
  LoRA params P          forward 2P + input gradients 2P + weight gradients 2P = 6P
  output head V*h        4*V*h, only at positions whose logits the loss reads (supervised
                         targets when the loss skips the others, else every token)
  causal attention       forward 4*q_dim*(i+1) for the query at position i (QK^T and AV over
                         i+1 keys), summed over the row: 2*q_dim*L*(L+1) per layer; backward 2x
Not useful, never counted: the forward recomputed by gradient checkpointing, attention scores
a kernel computes above the causal diagonal, padding, elementwise work (norms, rotary, softmax,
dequantization). Hardware FLOPs (what the plan's time estimate needs) add the recompute.

Preference jobs (qlora.training.preference). A pair is two sequences, chosen and rejected, each
counted as a row: its tokens are the tokens of both, once. DPO's reference forward (the same
model with the adapter off, no_grad) is counted as useful: the loss cannot be computed without it
(a recompute only trades FLOPs for memory), and leaving it out would understate how busy the GPU
is by ~1/3. It is a forward of the frozen base alone: 2W per token (no LoRA), the causal attention
forward, and the head at the positions it scores (the answers' targets, as the policy's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

from qlora.plan.architecture import Architecture


@dataclass(frozen=True)
class FlopModel:
    """Per-token and per-row FLOP coefficients of one model + LoRA setup."""

    base_linear_weights: int  # frozen matmul weights inside the decoder layers
    lora_params: int
    head_weights: int  # vocab x hidden: the output head (tied or not, it is one matmul)
    attention_width: int  # layers x q_dim

    @classmethod
    def of(cls, arch: Architecture, lora_params: int) -> "FlopModel":
        return cls(arch.quantized_params, lora_params, arch.vocab * arch.hidden, arch.layers * arch.q_dim)

    def forward_per_token(self) -> float:
        """Forward matmul FLOPs of one token outside attention and the head."""
        return 2.0 * (self.base_linear_weights + self.lora_params)

    def attention_forward(self, length: int) -> float:
        """Causal attention forward FLOPs of one row of `length` tokens, all layers."""
        return 2.0 * self.attention_width * length * (length + 1)

    def useful(self, row_lengths: Sequence[int], head_positions: int) -> float:
        """Useful training FLOPs of rows of these lengths, the head applied at `head_positions` positions."""
        tokens = sum(row_lengths)
        dense = tokens * (4.0 * self.base_linear_weights + 6.0 * self.lora_params)
        return (
            dense
            + 4.0 * self.head_weights * head_positions
            + 3.0 * sum(self.attention_forward(length) for length in row_lengths)
        )

    def reference_forward(self, row_lengths: Sequence[int], head_positions: int) -> float:
        """DPO's reference pass over rows of these lengths: a forward of the frozen base with the
        adapter off (no LoRA, no backward), the head applied at `head_positions` positions."""
        return (
            2.0 * self.base_linear_weights * sum(row_lengths)
            + 2.0 * self.head_weights * head_positions
            + sum(self.attention_forward(length) for length in row_lengths)
        )

    def per_token(
        self, seq_len: int, gradient_checkpointing: Union[bool, str], reference_forward: bool = False
    ) -> float:
        """Hardware FLOPs per token of full rows of seq_len tokens, the head on every token:
        the useful FLOPs (with DPO's reference forward) + the forward that checkpointing
        recomputes (head excluded: it is outside the checkpointed layers; "selective" keeps the
        frozen base matmuls' outputs, so only the LoRA branch and attention are recomputed; the
        reference, under no_grad, is never recomputed)."""
        useful = self.useful([seq_len], seq_len) / seq_len
        if reference_forward:
            useful += self.reference_forward([seq_len], seq_len) / seq_len
        if not gradient_checkpointing:
            return useful
        recomputed_linears = (
            self.forward_per_token() if gradient_checkpointing != "selective" else 2.0 * self.lora_params
        )
        return useful + recomputed_linears + self.attention_forward(seq_len) / seq_len


def mfu(useful_flops: float, seconds: float, peak_flops_per_s: float) -> float:
    """Model FLOPs utilization: useful FLOPs per second over the device's measured peak."""
    return useful_flops / seconds / peak_flops_per_s if seconds > 0 and peak_flops_per_s > 0 else 0.0


@dataclass(frozen=True)
class FlopMeter:
    """What the loop needs for MFU: useful FLOPs of a micro-batch, and the peak to divide by."""

    model: FlopModel
    peak_flops_per_s: float
    head_on_supervised_only: bool = False  # True when the loss computes logits only at supervised targets
    reference_forward: bool = False  # DPO: each micro-batch also runs the reference forward (useful: see above)
    # batch -> positions the loss's head projects, where these are not the supervised targets
    # (ORPO: its NLL reads every chosen position too; the objective's head_positions)
    head_positions: Optional[Callable] = None

    def of_batch(self, batch) -> float:
        """Useful FLOPs of a micro-batch with `row_lengths` and `supervised_tokens` (no device
        tensor is read); a pair batch's row_lengths are its chosen and rejected sequences."""
        if self.head_positions is not None:
            head = self.head_positions(batch)
        else:
            head = batch.supervised_tokens if self.head_on_supervised_only else sum(batch.row_lengths)
        useful = self.model.useful(batch.row_lengths, head)
        if self.reference_forward:  # DPO's reference scores the answers' targets
            useful += self.model.reference_forward(batch.row_lengths, batch.supervised_tokens)
        return useful
