"""What users see of the data: an example's text with the supervised spans marked, and a set's
statistics in one line."""

from __future__ import annotations

from itertools import groupby

from qlora.data.tokenize import Example
from qlora.labels import IGNORE_INDEX

SUPERVISED_OPEN = "⟦"
SUPERVISED_CLOSE = "⟧"
ELLIPSIS = "…"


def render_supervision(example: Example, tokenizer, max_chars: int = 2000) -> str:
    """The example's text with ⟦ ⟧ around what the model is trained to produce (plain text).

    Special tokens are shown, since whether the EOS is inside the brackets is the point.
    Text beyond max_chars is cut and replaced by an ellipsis.
    """
    pieces = []
    remaining = max_chars
    tokens_and_labels = zip(example.input_ids, example.labels)
    for supervised, group in groupby(tokens_and_labels, key=lambda pair: pair[1] != IGNORE_INDEX):
        if remaining <= 0:
            pieces.append(ELLIPSIS)
            break
        text = tokenizer.decode(
            [token for token, _ in group], skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        shown = text[:remaining]
        remaining -= len(shown)
        pieces.append(f"{SUPERVISED_OPEN}{shown}{SUPERVISED_CLOSE}" if supervised else shown)
        if len(shown) < len(text):
            pieces.append(ELLIPSIS)
            break
    return "".join(pieces)


def describe_data(name: str, stats: dict) -> str:
    """One line of a tokenized set's statistics (TokenizedSet.stats), as training and validate print it."""
    parts = [
        f"{stats['kept']} rows kept of {stats['rows']}",
        f"{stats['supervised_tokens']:,} supervised / {stats['total_tokens']:,} tokens",
        f"row length min/p50/p95/max {stats['length_min']}/{stats['length_p50']}/"
        f"{stats['length_p95']}/{stats['length_max']}",
    ]
    if stats["rows_over_max_seq_len"]:
        dropped = stats["dropped_too_long"] + stats["dropped_no_supervision_after_truncation"]
        parts.append(
            f"{stats['rows_over_max_seq_len']} over max_seq_len ({stats['truncated']} truncated, {dropped} dropped)"
        )
    return f"{name} data: " + ", ".join(parts)
