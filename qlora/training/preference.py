"""Preference objectives for the loop: DPO (sigmoid, conservative label smoothing, IPO) and ORPO.

A batch is a padding-free pair batch (qlora.data.pairs): [c0, r0, c1, r1, ...] in one forward,
`sequence_ids` saying which sequence each position belongs to. A sequence's log-prob is the sum of
its answer tokens' log-probs; they come from the chunked-loss machinery (qlora.training.loss): the
model's forward keeps hidden states at the answer columns only, and the head projects them a
chunk at a time (chunks checkpointed), so no full-vocabulary float32 logits of a long sequence
ever exist at once.

DPO's reference is the same model inside `reference()`, a context manager the job hands in (the
base with the adapter switched off: peft's disable_adapter), run under no_grad, so DPO keeps no
second model in memory and this module imports no adapter library. It is recomputed every step:
nothing cached that a resume could miss.

Normalization over gradient accumulation: per pair. The loop divides a window's summed loss by
`start_window`'s units, the window's pairs, so the loss is the mean over every pair of the window,
whichever micro-batch it landed in (TRL averages per micro-batch, then over the window: the same
for equal micro-batches). ORPO's NLL is a mean per chosen token, as TRL's is within one batch; over
a window it is the mean over all of the window's chosen tokens, as SFT's loss is.

Under torchrun every rank holds the whole window (the loop's stream), so these units need no
all-reduce; the readings do: `readings()` sums every rank's (a filler pass adds nothing). The
reference forward is a second, no-grad forward through the DDP / FSDP wrapper: it prepares no
backward, so DDP still sees one forward per backward, every LoRA weight used.

The same numbers as TRL 1.16: DPOTrainer (loss_type sigmoid, ipo: its margin per answer token)
and ORPOTrainer (average log-probs per answer token, the NLL over the whole chosen sequence,
prompt included); tests/test_preference_oracle.py holds both side by side.
"""

from __future__ import annotations

from typing import Callable, ContextManager, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from qlora.labels import IGNORE_INDEX
from qlora.plan.loss_chunks import loss_chunk_tokens
from qlora.training.distributed import World, summed
from qlora.training.loss import final_hidden_states, head_reproduces_logits, model_inputs, output_head, over_chunks

LN_HALF = -0.6931471805599453


class PreferenceObjective:
    """loss_sum / start_window / readings, the loop's objective interface (qlora.training.loss.TokenObjective)."""

    per_token = False  # a mean per pair: exp(loss) is no perplexity

    def __init__(
        self,
        kind: str,
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        dpo_loss: str = "sigmoid",
        orpo_lambda: float = 0.1,
        reference: Optional[Callable[[], ContextManager]] = None,
        world: World = World(),
    ):
        if kind not in ("dpo", "orpo"):
            raise ValueError(f"preference objective must be dpo or orpo, got {kind!r}")
        if kind == "dpo" and reference is None:
            raise ValueError("dpo needs `reference`: a context manager in which the model is the reference")
        self.kind, self.beta, self.label_smoothing = kind, beta, label_smoothing
        self.dpo_loss, self.orpo_lambda, self.reference = dpo_loss, orpo_lambda, reference
        self.world = world  # readings are means over every rank's pairs
        self._window_pairs, self._window_chosen_tokens = 1, 1
        self._sums: dict[str, torch.Tensor] = {}
        self._pairs = 0

    def head_positions(self, batch) -> int:
        """Positions the policy's head projects for this batch (what the MFU meter counts): the
        answers' targets, and for ORPO every next token of the chosen sequences. DPO's reference
        projects the answers' targets (the meter's reference_forward). Reads CPU tensors only."""
        return int(scored_columns(batch, self.kind == "orpo").sum())

    def start_window(self, batches: Sequence) -> int:
        """The window's units: its pairs (and, for ORPO, its chosen tokens, the NLL's denominator)."""
        self._window_pairs = sum(batch.pairs for batch in batches)
        self._window_chosen_tokens = sum(int(chosen_sequence_targets(batch).sum()) for batch in batches)
        return self._window_pairs

    def loss_sum(
        self, model: torch.nn.Module, batch, device, chunk_tokens: Union[int, str] = "auto", counted: bool = True
    ) -> torch.Tensor:
        """The batch's share of the window's loss x the window's pairs (the loop divides by them).
        Not `counted`: a rank's filler pass (qlora.training.distributed.share), kept out of the readings."""
        whole_chosen = self.kind == "orpo"
        log_probs, columns = target_log_probs(model, batch, device, chunk_tokens, whole_chosen)
        answer_logps, answer_tokens = per_answer(log_probs, columns, batch, device)
        chosen, rejected = answer_logps[0::2], answer_logps[1::2]
        if self.kind == "dpo":
            with torch.no_grad(), self.reference():
                reference_logps, _ = answer_log_probs(model, batch, device, chunk_tokens)
            losses, rewards = self.dpo(chosen, rejected, reference_logps, answer_tokens)
            extra = {}
        else:
            chosen_mask = chosen_sequence_targets(batch)[0, columns].to(device)
            nll_sum = -(log_probs * chosen_mask).sum()
            losses, rewards, extra = self.orpo(chosen / answer_tokens[0::2], rejected / answer_tokens[1::2])
            # The NLL's mean over the window's chosen tokens, in pair units: / pairs comes in the loop.
            nll_share = nll_sum * (self._window_pairs / max(self._window_chosen_tokens, 1))
            losses = losses.sum() + nll_share
            extra["nll_loss"] = nll_share.detach()
        self.keep(
            {
                "rewards/chosen": rewards[0].sum(),
                "rewards/rejected": rewards[1].sum(),
                "rewards/margin": (rewards[0] - rewards[1]).sum(),
                "rewards/accuracy": (rewards[0] > rewards[1]).float().sum(),
                "logps/chosen": chosen.detach().sum(),
                "logps/rejected": rejected.detach().sum(),
                # The model's own preference, no reference: what the base's ~50% and a trained adapter's differ in.
                "logps/accuracy": (chosen > rejected).float().sum(),
                **extra,
            },
            batch.pairs if counted else 0,
        )
        return losses.sum()

    def dpo(self, chosen, rejected, reference_logps, answer_tokens):
        chosen_ratio = chosen - reference_logps[0::2]
        rejected_ratio = rejected - reference_logps[1::2]
        if self.dpo_loss == "ipo":
            margin = chosen_ratio / answer_tokens[0::2] - rejected_ratio / answer_tokens[1::2]
            losses = (margin - 1 / (2 * self.beta)) ** 2
        else:
            scaled = self.beta * (chosen_ratio - rejected_ratio)
            smoothing = self.label_smoothing
            losses = -(1 - smoothing) * F.logsigmoid(scaled) - smoothing * F.logsigmoid(-scaled)
        return losses, (self.beta * chosen_ratio.detach(), self.beta * rejected_ratio.detach())

    def orpo(self, chosen_mean, rejected_mean):
        """Odds ratio of the per-token mean log-probs; returns -lambda x log sigmoid(log odds) per pair."""
        log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
        ratio = F.logsigmoid(log_odds)
        rewards = (self.orpo_lambda * chosen_mean.detach(), self.orpo_lambda * rejected_mean.detach())
        extra = {"log_odds_ratio": ratio.detach().sum(), "log_odds_chosen": log_odds.detach().sum()}
        return -self.orpo_lambda * ratio, rewards, extra

    def keep(self, sums: dict, pairs: int) -> None:
        """Add a batch's sums over its `pairs` (0: a filler's, added as zeros so that every rank
        holds the same names, in the same order, for the reduction)."""
        for name, value in sums.items():
            value = value.detach().float() * (1.0 if pairs else 0.0)
            self._sums[name] = self._sums.get(name, 0) + value
        self._pairs += pairs

    def readings(self) -> dict[str, float]:
        """Means per pair since the last call, over every rank's pairs (one host transfer, one
        all-reduce; every rank calls it at the same point), then reset."""
        if not self._sums:
            return {}
        names = list(self._sums)
        values = torch.stack([self._sums[name].reshape(()) for name in names]).tolist()
        *values, pairs = summed(self.world, values + [self._pairs])
        self._sums, self._pairs = {}, 0
        return {name: value / max(pairs, 1) for name, value in zip(names, values)}


def chosen_sequence_targets(batch) -> torch.Tensor:
    """[1, T] True where a chosen sequence has a next token: ORPO's NLL positions."""
    sequences = batch.sequence_ids.unsqueeze(0)
    return (sequences >= 0) & (sequences % 2 == 0) & (batch.next_tokens != IGNORE_INDEX)


def answer_log_probs(model, batch, device, chunk_tokens: Union[int, str] = "auto"):
    """(summed answer log-prob, answer tokens) of every sequence of a pair batch, [2 x pairs] each:
    pair i's chosen at 2i, its rejected at 2i + 1. DPO's reference pass, and `qlora eval` on pairs."""
    return per_answer(*target_log_probs(model, batch, device, chunk_tokens, False), batch, device)


def per_answer(log_probs, columns, batch, device):
    """(summed answer log-prob, answer tokens) per sequence, [2 x pairs] each, from the log-probs
    at the scored `columns` (with ORPO's, the chosen prompts' columns are among them: not summed)."""
    answer = (batch.targets[0, columns] != IGNORE_INDEX).to(device)
    sequences = batch.sequence_ids[columns].to(device)
    zeros = log_probs.new_zeros(2 * batch.pairs)
    summed = zeros.index_add(0, sequences, log_probs * answer)
    tokens = zeros.detach().index_add(0, sequences, answer.to(zeros.dtype)).clamp_min(1)
    return summed, tokens


def scored_columns(batch, whole_chosen: bool) -> torch.Tensor:
    """[T] True at the columns whose next-token log-prob is read: the answers' targets, and with
    `whole_chosen` (ORPO's NLL) every position of the chosen sequences."""
    wanted = batch.targets[0] != IGNORE_INDEX
    if whole_chosen:
        wanted = wanted | chosen_sequence_targets(batch)[0]
    return wanted


def target_log_probs(model, batch, device, chunk_tokens, whole_chosen: bool):
    """(log-prob of the next token at each wanted column, those columns): the answers' targets,
    and with `whole_chosen` every position of the chosen sequences. Chunked like the SFT loss."""
    columns = scored_columns(batch, whole_chosen).nonzero().flatten()
    tokens = batch.next_tokens[0, columns].to(device)
    inputs = model_inputs(batch, device)
    head = output_head(model)
    if chunk_tokens == "off" or head is None or not head_reproduces_logits(model, head, inputs):
        logits = model(**inputs, logits_to_keep=columns.to(device)).logits[0]
        return -F.cross_entropy(logits.float(), tokens, reduction="none"), columns
    size = loss_chunk_tokens(head.weight.shape[0], chunk_tokens)
    hidden = final_hidden_states(model, head, inputs, columns.to(device))[0]
    parts = list(over_chunks(chunk_log_probs, head, hidden, tokens, size))  # as the SFT loss chunks
    return (torch.cat(parts) if parts else hidden[:0, 0].float()), columns


def chunk_log_probs(head: torch.nn.Module, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(head(hidden).float(), tokens, reduction="none")


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler's switch at log 1/2)."""
    return torch.where(x > LN_HALF, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
