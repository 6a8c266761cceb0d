"""A preference fixture on the demo model: the chosen answer follows a rule the rejected breaks.

Two instructions the demo base has never seen: "Mirror: letters" (chosen: reversed, rejected:
copied) and "Echo: letters" (chosen: in capitals, rejected: copied). The base prefers the
reversal for Mirror and the plain copy for Echo (measured: 100% and 0% of pairs), so on a mix
of both it agrees with the rule on about half the pairs; DPO must flip Echo and keep Mirror.
"""

from __future__ import annotations

import difflib
import json
import random
from pathlib import Path

RULES = {"Mirror": lambda letters: letters[::-1], "Echo": str.upper}


def rule_pair(instruction: str, letters: str) -> dict:
    return {
        "prompt": [{"role": "user", "content": f"{instruction}: {letters}"}],
        "chosen": [{"role": "assistant", "content": RULES[instruction](letters)}],
        "rejected": [{"role": "assistant", "content": letters}],
    }


def write_rule_pairs(path: Path, count: int, seed: int, exclude: frozenset = frozenset()) -> set[str]:
    """`count` pairs, the instructions alternating; returns the letter strings used."""
    rng = random.Random(seed)
    used: set[str] = set()
    with open(path, "w") as handle:
        while len(used) < count:
            letters = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 10)))
            if letters == letters[::-1] or letters in used or letters in exclude:
                continue
            handle.write(json.dumps(rule_pair(list(RULES)[len(used) % 2], letters)) + "\n")
            used.add(letters)
    return used


def write_mixed_demonstrations(path: Path, count: int, seed: int) -> set[str]:
    """SFT chat rows on the same prompts whose answers follow the rule only half the time (the
    other half copy the letters): demonstrations of mixed quality, what preference tuning fixes."""
    rng = random.Random(seed)
    used: set[str] = set()
    with open(path, "w") as handle:
        while len(used) < count:
            letters = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 10)))
            if letters == letters[::-1] or letters in used:
                continue
            pair = rule_pair(list(RULES)[len(used) % 2], letters)
            answer = pair["chosen"] if rng.random() < 0.5 else pair["rejected"]
            handle.write(json.dumps({"messages": pair["prompt"] + answer}) + "\n")
            used.add(letters)
    return used


def rule_prompts(path: Path) -> list[tuple[str, str, str]]:
    """(user message, the rule's answer, the copy) of every pair in a file write_rule_pairs wrote."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [(row["prompt"][0]["content"], row["chosen"][0]["content"], row["rejected"][0]["content"]) for row in rows]


def follows_rule(answer: str, rule_answer: str, copy: str) -> bool:
    """Closer to the rule's answer than to the copy (difflib's similarity): a small model's answer
    is often one letter off, yet plainly a reversal (or capitals), or plainly a copy."""
    similarity = lambda a, b: difflib.SequenceMatcher(None, a, b).ratio()  # noqa: E731
    return similarity(answer, rule_answer) > similarity(answer, copy)
