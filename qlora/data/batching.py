"""Examples -> the micro-batches of one epoch, packed or padded, in a seeded order.

Targets are built here, not in the model: targets[b, t] is the label of the next token of the
same row, so no position ever learns to predict the first token of the following packed row or
a padding token. The loss is then a plain cross-entropy over targets with ignore_index=-100.

Padding is marked by the attention mask (unpacked) or by being its own position segment
(packed), never by its id: pad_id may equal the EOS id, and the EOS is a target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qlora.data.tokenize import Example
from qlora.labels import IGNORE_INDEX

# A padding-free micro-batch's length is rounded up to a multiple of this (at most 63 tokens of
# padding, their own position segment, never a target): on CPU, bf16 matmuls go through oneDNN,
# which caches a primitive per shape, and padding-free batches of every possible length made
# hundreds of them (demo job, bf16, 40 steps: peak RSS 937 MiB -> 814 MiB, the same time; the
# float32 MKL path keeps none: 650 MiB). Padded batches keep their width: rounding would add up to
# 63 tokens per row.
SHAPE_MULTIPLE = 64

if TYPE_CHECKING:
    import torch


@dataclass
class Batch:
    input_ids: torch.LongTensor
    """[B, T] token ids; padding is pad_id."""
    position_ids: torch.LongTensor
    """[B, T] 0, 1, 2 ... restarting at every row and at the padding tail."""
    targets: torch.LongTensor
    """[B, T] the next token's label within the same row; -100 at each row's last token, on padding
    and where unsupervised."""
    attention_mask: torch.LongTensor | None
    """[B, T] 1 = real token, 0 = padding, for unpacked batches; None when packed (the model
    derives a block-diagonal causal mask from position_ids)."""
    row_ids: list[int]
    """Indexes into the examples list of the rows in this batch, in order."""
    supervised_tokens: int
    """Number of targets that are not -100."""
    row_lengths: list[int]
    """Tokens of each row, in order (padding excluded): what the loop's FLOP count needs."""


def epoch_batches(
    examples: list[Example],
    micro_batch_size: int,
    packing: bool,
    max_seq_len: int,
    pad_id: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    padding_free: bool = False,
) -> list[Batch]:
    """All micro-batches of one epoch; the same (seed, epoch) always gives the same batches.

    padding_free: each micro-batch's sequences become ONE sequence of their rows end to end
    ([1, total tokens]): the same rows as the padded batch, no compute on padding, and rows
    kept apart by their restarting position ids, as in a packed sequence.
    """
    sequences = epoch_sequences(examples, packing, max_seq_len, seed, epoch, shuffle)
    groups = [sequences[start : start + micro_batch_size] for start in range(0, len(sequences), micro_batch_size)]
    if padding_free:
        return [
            collate(
                [[index for sequence in group for index in sequence]],
                examples,
                pad_id,
                with_attention_mask=False,
                width_multiple=SHAPE_MULTIPLE,
            )
            for group in groups
        ]
    return [collate(group, examples, pad_id, with_attention_mask=not packing) for group in groups]


def batches_per_epoch(
    examples: list[Example], micro_batch_size: int, packing: bool, max_seq_len: int, seed: int
) -> int:
    """len(epoch_batches(..., epoch=0)) without building any tensors."""
    return math.ceil(
        len(epoch_sequences(examples, packing, max_seq_len, seed, epoch=0, shuffle=True)) / micro_batch_size
    )


def epoch_sequences(
    examples: list[Example], packing: bool, max_seq_len: int, seed: int, epoch: int, shuffle: bool
) -> list[list[int]]:
    """The example indexes of each sequence of one epoch: one row each, or packed rows."""
    order = row_order(len(examples), seed, epoch, shuffle)
    if packing:
        return pack([len(examples[index].input_ids) for index in order], order, max_seq_len)
    return [[index] for index in order]


def row_order(count: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """A fresh permutation per epoch, reproducible on resume from (seed, epoch) alone."""
    if not shuffle:
        return list(range(count))
    import torch

    generator = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(count, generator=generator).tolist()


def pack(lengths: list[int], order: list[int], max_seq_len: int) -> list[list[int]]:
    """Rows, in the given order, filled into sequences of at most max_seq_len tokens.

    Next-fit: a row that does not fit closes the current sequence. It keeps the shuffled order
    (so the data order is exactly the seeded one) and never splits a row.
    """
    sequences: list[list[int]] = []
    current: list[int] = []
    used = 0
    for length, index in zip(lengths, order):
        if length > max_seq_len:
            raise ValueError(f"example {index} has {length} tokens, more than max_seq_len={max_seq_len}")
        if current and used + length > max_seq_len:
            sequences.append(current)
            current, used = [], 0
        current.append(index)
        used += length
    if current:
        sequences.append(current)
    return sequences


def collate(
    sequences: list[list[int]], examples: list[Example], pad_id: int, with_attention_mask: bool, width_multiple: int = 1
) -> Batch:
    """Tensors for sequences of rows, right-padded to the longest sequence in the batch, rounded up
    to a multiple of `width_multiple`."""
    import torch

    width = max(sum(len(examples[index].input_ids) for index in sequence) for sequence in sequences)
    width = math.ceil(width / width_multiple) * width_multiple
    input_ids, position_ids, targets, attention_mask = [], [], [], []
    for sequence in sequences:
        ids, positions, next_labels = [], [], []
        for index in sequence:
            example = examples[index]
            ids += example.input_ids
            positions += range(len(example.input_ids))
            next_labels += example.labels[1:] + [IGNORE_INDEX]
        real = len(ids)
        padding = width - real
        input_ids.append(ids + [pad_id] * padding)
        position_ids.append(positions + list(range(padding)))
        targets.append(next_labels + [IGNORE_INDEX] * padding)
        attention_mask.append([1] * real + [0] * padding)
    targets_tensor = torch.tensor(targets, dtype=torch.long)
    return Batch(
        input_ids=torch.tensor(input_ids, dtype=torch.long),
        position_ids=torch.tensor(position_ids, dtype=torch.long),
        targets=targets_tensor,
        attention_mask=torch.tensor(attention_mask, dtype=torch.long) if with_attention_mask else None,
        row_ids=[index for sequence in sequences for index in sequence],
        supervised_tokens=int((targets_tensor != IGNORE_INDEX).sum()),
        row_lengths=[len(examples[index].input_ids) for sequence in sequences for index in sequence],
    )
