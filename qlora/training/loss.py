"""Summed next-token cross-entropy, with full-vocabulary logits for one chunk of supervised
positions at a time, never for the whole micro-batch.

The model's own forward runs once, with `logits_to_keep` at the columns holding a supervised
target (so its wrappers all apply: peft, gradient checkpointing); a pre-hook on its output
head takes the head's input (the final hidden states at those columns) and hands the head an
empty tensor instead. The loss then projects the supervised hidden states
chunk by chunk: head -> float32 -> cross-entropy (sum), each chunk but the last inside a
non-reentrant checkpoint, so its logits are freed after its forward and recomputed in backward
(the last one's backward comes first, so keeping its logits costs no more). Under no_grad
(eval) the chunks run without checkpointing. Mixed precision is the caller's: the loop runs the
whole loss, forward and chunks, under its explicit autocast (qlora.training.precision), so the
head computes each chunk in the dtype it would have inside the forward.

Some models post-process logits inside their forward (Gemma 2's softcap, Cohere's logit scale):
the head alone does not give their logits. A probe at a model's first loss (a few positions,
eval mode, no_grad: no random numbers drawn) compares the model's own logits with the head's
output; when they differ, that model's loss takes the whole path (the model's own logits at
every supervised column at once), and it says so once on stderr.
"""

from __future__ import annotations

import sys
import weakref
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from qlora.labels import IGNORE_INDEX
from qlora.plan.loss_chunks import loss_chunk_tokens

PROBE_TOKENS = 16  # positions the probe compares: enough to see a softcap, cheap next to a step

# model -> whether its head alone reproduces its logits; decided once per model object
_head_reproduces_logits: "weakref.WeakKeyDictionary[torch.nn.Module, bool]" = weakref.WeakKeyDictionary()


class TokenObjective:
    """SFT's objective for the loop: summed cross-entropy over the supervised targets, normalized by
    the window's supervised tokens. The loop's interface (preference objectives have the same):
    start_window(batches) -> the units a window's summed loss is divided by; loss_sum(model, batch,
    device, chunk_tokens, counted) -> that batch's sum (not `counted`: a rank's filler pass, which the
    loop zeroes); readings() -> extra metrics per unit since the last call, called on every rank;
    per_token: whether the loss is a mean per token (then exp(eval loss) is a perplexity)."""

    per_token = True

    def __init__(self, summed_loss=None):
        self.summed_loss = summed_loss or summed_cross_entropy

    def start_window(self, batches) -> int:
        return sum(batch.supervised_tokens for batch in batches)

    def loss_sum(
        self, model: torch.nn.Module, batch, device, chunk_tokens: Union[int, str] = "auto", counted: bool = True
    ) -> torch.Tensor:
        return self.summed_loss(model, batch, device, chunk_tokens)  # a filler's (not counted) the loop zeroes

    def readings(self) -> dict:
        return {}


def summed_cross_entropy(model: torch.nn.Module, batch, device, chunk_tokens: Union[int, str] = "auto") -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropy over the batch's supervised targets.

    chunk_tokens: supervised positions per chunk, "auto" (qlora.plan.loss_chunks.loss_chunk_tokens: one
    chunk's float32 logits within a fixed budget) or "off" (the whole path).
    """
    inputs = model_inputs(batch, device)
    columns = (batch.targets != IGNORE_INDEX).any(dim=0).nonzero().flatten()
    head = output_head(model)
    if chunk_tokens == "off" or head is None or not head_reproduces_logits(model, head, inputs):
        return whole_summed_loss(model, inputs, columns, batch.targets[:, columns].to(device))
    size = loss_chunk_tokens(head.weight.shape[0], chunk_tokens)
    hidden = final_hidden_states(model, head, inputs, columns.to(device))
    # The supervised (row, column) pairs, found on the CPU batch: no host sync.
    kept_targets = batch.targets[:, columns].flatten()
    supervised = (kept_targets != IGNORE_INDEX).nonzero().flatten()
    hidden = hidden.flatten(0, 1).index_select(0, supervised.to(device))
    targets = kept_targets[supervised].to(device)
    total = hidden[:0].float().sum()  # zero, attached to the graph even without supervised tokens
    for part in over_chunks(chunk_loss, head, hidden, targets, size):
        total = total + part
    return total


def over_chunks(function: Callable, head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, size: int):
    """function(head, hidden rows, their targets) for each chunk of `size` rows, in order. The
    last chunk's backward runs first, right after this forward: its logits would be recomputed
    at once, so only the chunks before it are checkpointed (one chunk: none)."""
    for start in range(0, len(targets), size):
        part = (head, hidden[start : start + size], targets[start : start + size])
        if torch.is_grad_enabled() and start + size < len(targets):
            yield checkpoint(function, *part, use_reentrant=False)
        else:
            yield function(*part)


def chunk_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # Under the caller's autocast, as the forward was; a checkpointed chunk's recompute in
    # backward restores that autocast state itself (torch.utils.checkpoint records it).
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def whole_summed_loss(
    model: torch.nn.Module, inputs: dict, columns: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """The model's own logits at every column holding a supervised target, at once: its softcap
    and the mixed-precision autocast apply; prompt and padding columns get no logits."""
    logits = model(**inputs, logits_to_keep=columns.to(targets.device)).logits
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def model_inputs(batch, device) -> dict:
    return {
        "input_ids": batch.input_ids.to(device),
        "position_ids": batch.position_ids.to(device),
        "attention_mask": batch.attention_mask.to(device) if batch.attention_mask is not None else None,
        "use_cache": False,
    }


def output_head(model: torch.nn.Module) -> Optional[torch.nn.Module]:
    """The module projecting hidden states to vocabulary logits (through peft's and DDP's
    wrappers), or None when the model has no such module with a [vocab, hidden] weight."""
    for candidate in (model, getattr(model, "module", None)):
        get = getattr(candidate, "get_output_embeddings", None)
        head = get() if get is not None else None
        if head is not None and getattr(head, "weight", None) is not None and head.weight.dim() == 2:
            return head
    return None


def final_hidden_states(
    model: torch.nn.Module, head: torch.nn.Module, inputs: dict, columns: torch.Tensor
) -> Optional[torch.Tensor]:
    """The head's input at `columns` ([B, len(columns), hidden]) from the model's own forward;
    the head itself computes nothing (an empty input)."""
    captured = {}

    def take_input(module, args):
        captured["hidden"] = args[0]
        return (args[0][..., :0, :],) + tuple(args[1:])

    handle = head.register_forward_pre_hook(take_input)
    try:
        model(**inputs, logits_to_keep=columns)
    finally:
        handle.remove()
    return captured.get("hidden")


def head_reproduces_logits(model: torch.nn.Module, head: torch.nn.Module, inputs: dict) -> bool:
    """Whether the head alone gives the model's own logits; probed once per model (eval mode,
    no_grad, the first row's first PROBE_TOKENS positions), the answer kept for the model's life."""
    verdict = _head_reproduces_logits.get(model)
    if verdict is not None:
        return verdict
    width = min(PROBE_TOKENS, inputs["input_ids"].shape[1])
    probe = {name: value[:1, :width] if torch.is_tensor(value) else value for name, value in inputs.items()}
    columns = torch.arange(width, device=inputs["input_ids"].device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            own = model(**probe, logits_to_keep=columns).logits
            ours = head_outside_forward(head, final_hidden_states(model, head, probe, columns))
    finally:
        model.train(was_training)
    verdict = ours is not None and logits_agree(own, ours)
    if not verdict:
        print(
            f"note: {type(unwrapped(model)).__name__}'s logits are not its output head's alone "
            "(a softcap or logit scale?): "
            "its loss computes the logits of all supervised positions at once, not in chunks",
            file=sys.stderr,
        )
    _head_reproduces_logits[model] = verdict
    return verdict


def head_outside_forward(head: torch.nn.Module, hidden: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The head's logits called on its own, or None where it cannot be: the model's forward never
    called it, or its weight exists only inside that forward (a sharding that reshards the head
    after the forward; FSDP1 keeps its root unit, head included, whole until backward: tested)."""
    if hidden is None:
        return None
    try:
        return head(hidden)
    except RuntimeError:
        return None


def logits_agree(own: torch.Tensor, ours: torch.Tensor) -> bool:
    """Equal up to the rounding of the dtype the head computed in (a matmul over a different
    number of rows may sum in another order); a softcap or a scale moves logits far more."""
    if own.shape != ours.shape:
        return False
    tolerance = max(1e-5, 2 * torch.finfo(ours.dtype).eps)
    scale = own.float().abs().max().clamp_min(1.0)
    return bool(((own.float() - ours.float()).abs() <= tolerance * scale).all())


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside peft's (and DDP's) wrappers, for naming it."""
    model = getattr(model, "module", model)
    get_base = getattr(model, "get_base_model", None)
    return get_base() if get_base is not None else model
