"""What users see of an example: its text with the supervised spans marked."""

from __future__ import annotations

from itertools import groupby

from qlora.data.tokenize import IGNORE_INDEX, Example

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
        text = tokenizer.decode([token for token, _ in group], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        shown = text[:remaining]
        remaining -= len(shown)
        pieces.append(f"{SUPERVISED_OPEN}{shown}{SUPERVISED_CLOSE}" if supervised else shown)
        if len(shown) < len(text):
            pieces.append(ELLIPSIS)
            break
    return "".join(pieces)
