"""Preference rows for tests: string pairs and message-list pairs over the demo tokenizer."""

from __future__ import annotations

import json
import random
from pathlib import Path


def string_pair(word: str) -> dict:
    """Reverse a word: the chosen answer does, the rejected one repeats it."""
    return {"prompt": f"reverse {word}\n", "chosen": word[::-1], "rejected": word + "x"}


def message_pair(word: str, implicit: bool = False) -> dict:
    prompt = [{"role": "user", "content": f"reverse {word}"}]
    chosen = [{"role": "assistant", "content": word[::-1]}]
    rejected = [{"role": "assistant", "content": word}]
    if implicit:
        return {"chosen": prompt + chosen, "rejected": prompt + rejected}
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def write_pairs(path: Path, count: int, seed: int = 0, shape: str = "messages") -> Path:
    """`count` pairs of words of 2-10 letters (no palindromes: the two answers differ); shape:
    strings, messages or implicit."""
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for _ in range(count):
            word = ""
            while word == word[::-1]:
                word = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 10)))
            row = string_pair(word) if shape == "strings" else message_pair(word, implicit=shape == "implicit")
            handle.write(json.dumps(row) + "\n")
    return path
