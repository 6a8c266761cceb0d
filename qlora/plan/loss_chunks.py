"""How many supervised positions the chunked loss (qlora.training.loss) projects to the vocabulary
at once: one rule for the loss and for the plan that charges its memory. Imports nothing, so
the loop reaches it without the config."""

from __future__ import annotations

from typing import Optional, Union

# One loss chunk's float32 logits (train.loss_chunk_tokens: auto): big enough that the head's
# matmul stays efficient, small next to a 7B model's checkpointed activations at 2k tokens.
LOSS_CHUNK_BYTES = 256 * 2**20


def loss_chunk_tokens(vocab: int, setting: Union[int, str] = "auto") -> Optional[int]:
    """Supervised positions whose logits the loss computes at once (train.loss_chunk_tokens):
    the setting when a number; None when off (all of a micro-batch's at once); auto: as many
    as keep one chunk's float32 logits within LOSS_CHUNK_BYTES (Llama 3's 128k vocabulary: 523)."""
    if setting == "off":
        return None
    if setting == "auto":
        return max(1, LOSS_CHUNK_BYTES // (4 * vocab))
    return int(setting)
