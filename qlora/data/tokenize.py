"""Rows -> token ids + labels, with the length policy applied and the numbers users need.

Labels equal input_ids where the model is supervised and -100 elsewhere; they are NOT shifted
(batching shifts them within each row). Supervision is decided per token from the character
span the token starts in, so it follows the rendered text and not the tokenizer's merges.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass

from qlora.data.formats import Rendering, Span, render_prompt, render_row
from qlora.data.preference import pair_prompt
from qlora.data.sources import Row
from qlora.errors import DataError
from qlora.labels import IGNORE_INDEX


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    """input_ids where supervised, -100 elsewhere; not shifted."""
    row: Row
    truncated: bool


@dataclass
class TokenizedSet:
    examples: list[Example]
    stats: dict
    """rows, formats (of the rows), kept, truncated, dropped_too_long, dropped_no_supervision_after_truncation,
    rows_over_max_seq_len, total_tokens and supervised_tokens (of the kept examples, as trained),
    length_min/mean/p50/p95/max (tokens per row before truncation)."""


def tokenize_rows(rows: list[Row], tokenizer, max_seq_len: int, train_on: str, too_long: str) -> TokenizedSet:
    """Render, tokenize and label every row; apply too_long (truncate | drop) at max_seq_len."""
    if train_on not in ("completions", "all"):
        raise ValueError(f"train_on must be completions or all, got {train_on!r}")
    if too_long not in ("truncate", "drop"):
        raise ValueError(f"too_long must be truncate or drop, got {too_long!r}")
    if not rows:
        raise DataError("no rows to tokenize")
    require_usable_tokenizer(tokenizer)

    renderings = [render_row(row.fields, row.format, tokenizer, train_on, row.where) for row in rows]
    labelled = label_renderings(renderings, rows, tokenizer)

    examples = []
    truncated = dropped_too_long = dropped_no_supervision = 0
    for row, (input_ids, labels) in zip(rows, labelled):
        is_long = len(input_ids) > max_seq_len
        if is_long and too_long == "drop":
            dropped_too_long += 1
            continue
        if is_long:
            input_ids, labels = input_ids[:max_seq_len], labels[:max_seq_len]
            if learnable_tokens(labels) == 0:
                dropped_no_supervision += 1
                continue
            truncated += 1
        examples.append(Example(input_ids=input_ids, labels=labels, row=row, truncated=is_long))

    if not examples:
        raise DataError(
            f"no rows left to train on: of {len(rows)} rows, {dropped_too_long} are longer than "
            f"data.max_seq_len={max_seq_len} (too_long=drop) and {dropped_no_supervision} lost every "
            "supervised token to truncation"
        )
    row_lengths = [len(input_ids) for input_ids, _ in labelled]
    stats = {
        "rows": len(rows),
        "formats": sorted({row.format for row in rows}),
        "kept": len(examples),
        "truncated": truncated,
        "dropped_too_long": dropped_too_long,
        "dropped_no_supervision_after_truncation": dropped_no_supervision,
        "rows_over_max_seq_len": sum(length > max_seq_len for length in row_lengths),
        "total_tokens": sum(len(example.input_ids) for example in examples),
        "supervised_tokens": sum(learnable_tokens(example.labels) for example in examples),
        **length_summary(row_lengths),
    }
    return TokenizedSet(examples=examples, stats=stats)


def prompt_and_answer(row: Row, tokenizer) -> tuple[list[int], str]:
    """Token ids of a chat/alpaca row up to its last answer (ending with the generation prompt),
    and that answer's reference text, stripped: what a held-out greedy decode is compared with.
    A preference row: its prompt, and its chosen answer."""
    if row.format == "preference":
        prompt, add_special_tokens, answer = pair_prompt(row.fields, tokenizer, row.where)
    else:
        prompt, add_special_tokens, answer = render_prompt(row.fields, row.format, tokenizer, row.where)
    return tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"], answer


def learnable_tokens(labels: list[int]) -> int:
    """Supervised tokens the model can be trained to predict: a label at position 0 has no
    preceding token to predict it from, so it never becomes a target."""
    return sum(label != IGNORE_INDEX for label in labels[1:])


def require_usable_tokenizer(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("the tokenizer must be a fast (Rust) tokenizer: supervision is located through token offsets")
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token, so the model could not learn where an answer ends")


def label_renderings(renderings: list[Rendering], rows: list[Row], tokenizer) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per rendering, with the per-row hard checks applied."""
    encodings: list = [None] * len(renderings)
    for add_special_tokens in (True, False):
        indexes = [i for i, rendering in enumerate(renderings) if rendering.add_special_tokens == add_special_tokens]
        if not indexes:
            continue
        # One call per group: the Rust tokenizer encodes a whole list in parallel.
        batch = tokenizer(
            [renderings[i].text for i in indexes],
            add_special_tokens=add_special_tokens,
            return_offsets_mapping=True,
        )
        for position, i in enumerate(indexes):
            encodings[i] = (batch["input_ids"][position], batch["offset_mapping"][position])

    eos_id = tokenizer.eos_token_id
    terminators = turn_terminators(tokenizer)
    labelled = []
    for rendering, row, (input_ids, offsets) in zip(renderings, rows, encodings):
        input_ids = list(input_ids)
        starts = [start for start, _ in offsets]
        if rendering.supervise_all:
            labels = list(input_ids)
        else:
            labels = [
                token if starts_inside(start, rendering.supervised_spans) else IGNORE_INDEX
                for token, start in zip(input_ids, starts)
            ]
        for turn, span in enumerate(rendering.answer_spans, start=1):
            if not any(
                token in terminators and starts_inside(start, [span]) for token, start in zip(input_ids, starts)
            ):
                raise DataError(
                    f"{row.where}: assistant answer {turn} is not followed by the EOS token "
                    f"{tokenizer.eos_token!r} or another end-of-turn token in the rendered chat, "
                    "so the model would never learn to stop"
                )
        if rendering.append_eos:
            # A tokenizer that adds EOS itself already ended the sequence: supervise that one.
            if input_ids and input_ids[-1] == eos_id:
                labels[-1] = eos_id
            else:
                input_ids.append(eos_id)
                labels.append(eos_id)
        if learnable_tokens(labels) == 0:
            raise DataError(f"{row.where}: no supervised tokens, so there is nothing to learn from this row")
        labelled.append((input_ids, labels))
    return labelled


def turn_terminators(tokenizer) -> set[int]:
    """Tokens that can end an assistant turn: the EOS, and the special tokens a chat template
    closes turns with when they differ from it (Llama 3's <|eot_id|>, Gemma's <end_of_turn>)."""
    excluded = {tokenizer.bos_token_id} | ({tokenizer.pad_token_id} - {tokenizer.eos_token_id})
    special = {index for index, token in tokenizer.added_tokens_decoder.items() if token.special}
    return ({tokenizer.eos_token_id} | special) - excluded


def length_summary(lengths: list[int]) -> dict:
    """length_min/mean/p50/p95/max of token counts (nearest-rank percentiles)."""
    ordered = sorted(lengths)

    def percentile(fraction: float) -> int:
        return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]

    return {
        "length_min": ordered[0],
        "length_mean": round(sum(ordered) / len(ordered), 1),
        "length_p50": percentile(0.50),
        "length_p95": percentile(0.95),
        "length_max": ordered[-1],
    }


def starts_inside(position: int, spans: list[Span]) -> bool:
    """Whether a character position lies in one of the sorted, disjoint [start, end) spans."""
    index = bisect_right(spans, (position, float("inf"))) - 1
    return index >= 0 and spans[index][0] <= position < spans[index][1]
