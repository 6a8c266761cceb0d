"""Preference rows -> token ids + labels per side -> padding-free pair batches.

Each pair becomes two Examples (prompt + chosen answer, prompt + rejected answer), labelled
exactly as SFT rows are (tokenize.label_renderings: answers only, EOS included). A micro-batch of
pairs is ONE sequence [c0, r0, c1, r1, ...] end to end, rows kept apart by restarting position
ids, as SFT's padding-free batches; what a preference loss needs beyond SFT's targets is which
sequence each position belongs to (to sum each answer's log-probs) and, for ORPO's NLL, every
next token of the chosen sequences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qlora.data.batching import SHAPE_MULTIPLE, row_order
from qlora.data.preference import render_pair
from qlora.data.sources import Row
from qlora.data.tokenize import (
    Example,
    TokenizedSet,
    label_renderings,
    learnable_tokens,
    length_summary,
    require_usable_tokenizer,
)
from qlora.errors import DataError
from qlora.labels import IGNORE_INDEX

if TYPE_CHECKING:
    import torch


@dataclass
class Pair:
    chosen: Example
    rejected: Example
    row: Row

    @property
    def input_ids(self) -> list[int]:
        """Both sequences' tokens: what a batch of this pair holds (its length counts both)."""
        return self.chosen.input_ids + self.rejected.input_ids

    @property
    def labels(self) -> list[int]:
        return self.chosen.labels + self.rejected.labels


@dataclass
class PairBatch:
    input_ids: torch.LongTensor
    """[1, T] every pair's chosen then rejected sequence, end to end; padding is pad_id."""
    position_ids: torch.LongTensor
    """[1, T] restarting at every sequence and at the padding tail."""
    targets: torch.LongTensor
    """[1, T] the next token's label within the same sequence: answers only, -100 elsewhere."""
    next_tokens: torch.LongTensor
    """[1, T] the next token within the same sequence at every position (-100 at a sequence's
    last token and on padding): ORPO's NLL runs over the whole chosen sequence, as TRL's does."""
    sequence_ids: torch.LongTensor
    """[T] the sequence of each position: 2i = pair i's chosen, 2i + 1 its rejected; -1 on padding."""
    attention_mask: None
    pairs: int
    row_ids: list[int]
    """Indexes of the pairs in this batch, in order."""
    supervised_tokens: int
    """Answer targets (both sides)."""
    row_lengths: list[int]
    """Tokens of each sequence, chosen and rejected, in order: what the FLOP count needs."""


def tokenize_pairs(rows: list[Row], tokenizer, max_seq_len: int, too_long: str) -> TokenizedSet:
    """Every preference row's two sequences labelled; too_long (truncate | drop) per pair: a pair
    with a side over max_seq_len is dropped whole, or each side cut to it."""
    if not rows:
        raise DataError("no rows to tokenize")
    require_usable_tokenizer(tokenizer)
    renderings = [rendering for row in rows for rendering in render_pair(row.fields, tokenizer, row.where)]
    labelled = label_renderings(renderings, [row for row in rows for _ in range(2)], tokenizer)
    pairs, truncated, dropped_too_long, dropped_no_supervision = [], 0, 0, 0
    for index, row in enumerate(rows):
        sides = labelled[2 * index : 2 * index + 2]
        is_long = any(len(ids) > max_seq_len for ids, _ in sides)
        if is_long and too_long == "drop":
            dropped_too_long += 1
            continue
        sides = [(ids[:max_seq_len], labels[:max_seq_len]) for ids, labels in sides]
        if any(learnable_tokens(labels) == 0 for _, labels in sides):
            dropped_no_supervision += 1
            continue
        truncated += is_long
        chosen, rejected = (Example(ids, labels, row, is_long) for ids, labels in sides)
        pairs.append(Pair(chosen, rejected, row))
    if not pairs:
        raise DataError(
            f"no pairs left to train on: of {len(rows)} rows, {dropped_too_long} have a side longer than "
            f"data.max_seq_len={max_seq_len} (too_long=drop) and {dropped_no_supervision} lost an answer to truncation"
        )
    lengths = [len(ids) for ids, _ in labelled]
    examples = [side for pair in pairs for side in (pair.chosen, pair.rejected)]
    stats = {
        "rows": len(rows),
        "formats": ["preference"],
        "kept": len(pairs),
        "truncated": truncated,
        "dropped_too_long": dropped_too_long,
        "dropped_no_supervision_after_truncation": dropped_no_supervision,
        "rows_over_max_seq_len": sum(
            any(len(ids) > max_seq_len for ids, _ in labelled[i : i + 2]) for i in range(0, len(labelled), 2)
        ),
        "total_tokens": sum(len(example.input_ids) for example in examples),
        "supervised_tokens": sum(learnable_tokens(example.labels) for example in examples),
        **length_summary(lengths),
    }
    return TokenizedSet(examples=pairs, stats=stats)


def epoch_pair_batches(
    pairs: list[Pair], micro_batch_size: int, pad_id: int, seed: int, epoch: int, shuffle: bool = True
) -> list[PairBatch]:
    """All micro-batches of one epoch, micro_batch_size pairs each, in the seeded order SFT rows take."""
    order = row_order(len(pairs), seed, epoch, shuffle)
    return [
        collate_pairs(order[start : start + micro_batch_size], pairs, pad_id)
        for start in range(0, len(order), micro_batch_size)
    ]


def pair_batches_per_epoch(pairs: list[Pair], micro_batch_size: int) -> int:
    return math.ceil(len(pairs) / micro_batch_size)


def collate_pairs(indexes: list[int], pairs: list[Pair], pad_id: int) -> PairBatch:
    import torch

    sequences = [side for index in indexes for side in (pairs[index].chosen, pairs[index].rejected)]
    ids, positions, targets, next_tokens, sequence_ids = [], [], [], [], []
    for number, example in enumerate(sequences):
        ids += example.input_ids
        positions += range(len(example.input_ids))
        targets += example.labels[1:] + [IGNORE_INDEX]
        next_tokens += example.input_ids[1:] + [IGNORE_INDEX]
        sequence_ids += [number] * len(example.input_ids)
    padding = math.ceil(len(ids) / SHAPE_MULTIPLE) * SHAPE_MULTIPLE - len(ids)
    targets_tensor = torch.tensor([targets + [IGNORE_INDEX] * padding], dtype=torch.long)
    return PairBatch(
        input_ids=torch.tensor([ids + [pad_id] * padding], dtype=torch.long),
        position_ids=torch.tensor([positions + list(range(padding))], dtype=torch.long),
        targets=targets_tensor,
        next_tokens=torch.tensor([next_tokens + [IGNORE_INDEX] * padding], dtype=torch.long),
        sequence_ids=torch.tensor(sequence_ids + [-1] * padding, dtype=torch.long),
        attention_mask=None,
        pairs=len(indexes),
        row_ids=list(indexes),
        supervised_tokens=int((targets_tensor != IGNORE_INDEX).sum()),
        row_lengths=[len(example.input_ids) for example in sequences],
    )
