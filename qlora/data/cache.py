"""Tokenized data sets cached across runs: rendering and tokenizing a large set is the slow part
of startup, and reruns (resume, a sweep over learning rates) tokenize the same rows again.

The key is a sha256 over everything that shapes the token ids: every row (source, line, format,
fields, in order), the tokenizer (its full serialized form, special tokens and chat template),
max_seq_len / train_on / too_long (and, for a preference job's pairs, that they are pairs), and
the library versions (qlora's included). Any change is a miss, never a stale hit. Entries are
JSON files written atomically under <user cache>/tokenized/ (QLORA_CACHE_DIR). Rows are still
read and validated every run; only the tokenization is reused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Optional

from qlora.data.pairs import Pair, tokenize_pairs
from qlora.data.sources import Row
from qlora.data.tokenize import Example, TokenizedSet, tokenize_rows
from qlora.provenance import library_versions
from qlora.user_cache import cache_dir, write_json_atomically


def tokenize_rows_cached(
    rows: list[Row], tokenizer, max_seq_len: int, train_on: str, too_long: str, folder: Optional[Path] = None
) -> tuple[TokenizedSet, bool]:
    """tokenize_rows through the cache: (the tokenized set, whether it came from the cache)."""
    settings = {"max_seq_len": max_seq_len, "train_on": train_on, "too_long": too_long}

    def saved(example: Example, index: int) -> list:
        return [index, example.input_ids, example.labels, example.truncated]

    def restored(entry: list) -> Example:
        index, ids, labels, truncated = entry
        return Example(input_ids=ids, labels=labels, row=rows[index], truncated=truncated)

    return through_cache(
        rows, tokenizer, settings, folder, lambda: tokenize_rows(rows, tokenizer, **settings), saved, restored
    )


def tokenize_pairs_cached(
    rows: list[Row], tokenizer, max_seq_len: int, too_long: str, folder: Optional[Path] = None
) -> tuple[TokenizedSet, bool]:
    """tokenize_pairs through the cache: (the tokenized pairs, whether they came from the cache)."""
    settings = {"max_seq_len": max_seq_len, "too_long": too_long}

    def saved(pair: Pair, index: int) -> list:
        sides = (pair.chosen, pair.rejected)
        return [index, *([side.input_ids, side.labels] for side in sides), pair.chosen.truncated]

    def restored(entry: list) -> Pair:
        index, chosen, rejected, truncated = entry
        row = rows[index]
        return Pair(*(Example(ids, labels, row, truncated) for ids, labels in (chosen, rejected)), row)

    return through_cache(
        rows,
        tokenizer,
        {**settings, "pairs": True},
        folder,
        lambda: tokenize_pairs(rows, tokenizer, **settings),
        saved,
        restored,
    )


def through_cache(
    rows: list[Row],
    tokenizer,
    settings: dict,
    folder: Optional[Path],
    tokenize: Callable[[], TokenizedSet],
    saved: Callable[[object, int], list],
    restored: Callable[[list], object],
) -> tuple[TokenizedSet, bool]:
    """The cached set for these rows, tokenizer and settings, or `tokenize()`'s, then cached: each
    example kept as `saved(example, its row's index)`, read back by `restored`."""
    path = (folder or cache_dir() / "tokenized") / f"{fingerprint(rows, tokenizer, settings)}.json"
    try:
        entry = json.loads(path.read_text())
        return TokenizedSet(examples=[restored(item) for item in entry["examples"]], stats=entry["stats"]), True
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        pass
    tokenized = tokenize()
    row_index = {id(row): index for index, row in enumerate(rows)}
    record = {
        "examples": [saved(example, row_index[id(example.row)]) for example in tokenized.examples],
        "stats": tokenized.stats,
    }
    try:
        write_json_atomically(path, record)
    except OSError:
        pass  # a read-only cache only costs the next run its tokenization
    return tokenized, False


def fingerprint(rows: list[Row], tokenizer, settings: dict) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({**settings, "versions": library_versions()}, sort_keys=True).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update((backend.to_str() if backend is not None else repr(tokenizer.get_vocab().items())).encode())
    digest.update(
        json.dumps(
            [tokenizer.chat_template, tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token], default=str
        ).encode()
    )
    for row in rows:
        digest.update(json.dumps([row.source, row.line, row.format, row.fields], sort_keys=True, default=str).encode())
        digest.update(b"\n")
    return digest.hexdigest()
