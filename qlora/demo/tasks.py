"""The demo's tasks: character-level transformations of random lowercase letter strings.

The base model is pre-trained on three skills: keep the letters (copy), reverse their order,
and map them to capitals (uppercase). The fine-tuning task asks for both at once, under an
instruction the base has never seen: it composes skills the base already has, so a small
LoRA adapter learns it in minutes, while the base alone gets it ~never right.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Callable

LETTERS = string.ascii_lowercase
MIN_LETTERS, MAX_LETTERS = 3, 12


@dataclass(frozen=True)
class Task:
    name: str
    instruction: str
    """The user message is `{instruction}: {letters}`."""
    answer: Callable[[str], str]

    def row(self, letters: str) -> dict:
        """One chat row in the format `data.format: chat` reads."""
        return {
            "messages": [
                {"role": "user", "content": f"{self.instruction}: {letters}"},
                {"role": "assistant", "content": self.answer(letters)},
            ]
        }


def same(letters: str) -> str:
    return letters


def reversed_letters(letters: str) -> str:
    return letters[::-1]


def uppercase(letters: str) -> str:
    return letters.upper()


def reversed_uppercase(letters: str) -> str:
    return letters[::-1].upper()


PRETRAIN_TASKS = (
    Task("copy", "Repeat", same),
    Task("reverse", "Reverse", reversed_letters),
    Task("uppercase", "Uppercase", uppercase),
)
NEW_TASK = Task("reverse_uppercase", "Backwards in capitals", reversed_uppercase)


def random_letters(rng: random.Random) -> str:
    return "".join(rng.choices(LETTERS, k=rng.randint(MIN_LETTERS, MAX_LETTERS)))


def distinct_letters(rng: random.Random, count: int, exclude: set[str]) -> list[str]:
    """`count` different strings, none of them in `exclude`, in the order drawn."""
    chosen: list[str] = []
    seen = set(exclude)
    while len(chosen) < count:
        letters = random_letters(rng)
        if letters not in seen:
            seen.add(letters)
            chosen.append(letters)
    return chosen


def new_task_splits(seed: int, train_rows: int, eval_rows: int) -> tuple[list[dict], list[dict]]:
    """Train and held-out rows of the new task; no eval string appears in train."""
    rng = random.Random(f"new-task-{seed}")
    eval_letters = distinct_letters(rng, eval_rows, exclude=set())
    train_letters = distinct_letters(rng, train_rows, exclude=set(eval_letters))
    return [NEW_TASK.row(letters) for letters in train_letters], [NEW_TASK.row(letters) for letters in eval_letters]


def pretrain_rows(rng: random.Random, count: int, exclude: set[str]) -> list[dict]:
    """A mixed batch of the pre-training tasks; `exclude` keeps held-out strings unseen."""
    rows = []
    while len(rows) < count:
        letters = random_letters(rng)
        if letters not in exclude:
            rows.append(rng.choice(PRETRAIN_TASKS).row(letters))
    return rows
