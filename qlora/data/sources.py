"""Read training rows from files or cached datasets, validate every one, split off eval rows.

Every row keeps where it came from (`source`, `line`) so any later problem with it can be
reported as `file:line`. All rows are validated here, before any model is loaded.

What `line` means per source:
- .jsonl: the 1-based line number in the file (blank lines are skipped but counted);
- .csv: the file line on which the record ends, so with the header on line 1 the first data row is 2;
- .json, .parquet and cached datasets: the 1-based index of the row.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

from qlora.config import DATA_FILE_SUFFIXES
from qlora.data.formats import detect_format, validate_fields
from qlora.data.preference import SHAPES, is_preference, validate_preference
from qlora.errors import DataError


@dataclass(frozen=True)
class Row:
    source: str
    """The file path or dataset name as given."""
    line: int
    """Where the row is in its source (see the module docstring)."""
    format: str
    """alpaca, chat or text: resolved, never auto."""
    fields: dict
    """The raw row."""

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


def read_rows(sources: list[tuple[str, str]], key: str = "data.train", objective: str = "sft") -> list[Row]:
    """All rows of (path or dataset name, format) sources, validated; `key` names the config key in
    errors; `objective` (train.objective) says whether the rows must be preference pairs or must not."""
    rows = []
    for name, format in sources:
        records = read_records(name, key)
        if not records:
            raise DataError(f"{name}: no rows")
        first_line, first_fields = records[0]
        resolved = detect_format(first_fields, f"{name}:{first_line}") if format == "auto" else format
        for line, fields in records:
            check_objective(fields, resolved, objective, f"{name}:{line}", key)
            if resolved == "preference":
                validate_preference(fields, f"{name}:{line}")
            else:
                validate_fields(fields, resolved, f"{name}:{line}")
            rows.append(Row(source=name, line=line, format=resolved, fields=fields))
    return rows


def check_objective(fields, format: str, objective: str, where: str, key: str) -> None:
    """A preference row in an sft job, or an sft row in a dpo/orpo job, is a one-line error."""
    wants_pairs = objective != "sft"
    if wants_pairs and (format != "preference" or not is_preference(fields)):
        if not key.startswith("data."):  # qlora eval --data on a file of pairs
            raise DataError(f"{where}: not a preference row; {key} is read as pairs, each row {SHAPES}")
        raise DataError(
            f"{where}: a {format} row in a {objective} job; train.objective {objective} needs preference rows "
            "(prompt, chosen, rejected)"
        )
    if not wants_pairs and (format == "preference" or is_preference(fields)):
        if not key.startswith("data."):
            raise DataError(f"{where}: a preference row (chosen, rejected); {key} takes SFT rows only (for now)")
        raise DataError(f"{where}: a preference row (chosen, rejected) in an sft job; set train.objective: dpo or orpo")


def read_records(name: str, key: str) -> list[tuple[int, object]]:
    """(line, raw row) pairs of a data file or cached dataset."""
    path = Path(name)
    suffix = path.suffix.lower()
    if suffix in DATA_FILE_SUFFIXES:
        if not path.is_file():
            raise DataError(f"data file not found: {name}")
        reader = {".jsonl": read_jsonl, ".json": read_json, ".csv": read_csv, ".parquet": read_parquet}[suffix]
        try:
            return reader(path)
        except UnicodeDecodeError:
            raise DataError(f"{name}: not UTF-8 text") from None
    if path.is_file():
        raise DataError(f"{name}: unsupported file type; expected one of {', '.join(DATA_FILE_SUFFIXES)}")
    return read_cached_dataset(name, key)


def read_jsonl(path: Path) -> list[tuple[int, object]]:
    records = []
    with path.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                records.append((line_number, json.loads(line)))
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{line_number}: not valid JSON ({error.msg} at column {error.colno})") from None
    return records


def read_json(path: Path) -> list[tuple[int, object]]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{error.lineno}: not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(document, list):
        raise DataError(f"{path}: a .json data file must hold a list of rows, got a {type(document).__name__}")
    return list(enumerate(document, start=1))


def read_csv(path: Path) -> list[tuple[int, object]]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        # line_num is read after each record, so a quoted multi-line cell still reports a real line.
        return [(reader.line_num, record) for record in reader]


def read_parquet(path: Path) -> list[tuple[int, object]]:
    import pyarrow
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(path)
    except pyarrow.ArrowException as error:
        raise DataError(f"{path}: not a readable Parquet file ({error})") from None
    return list(enumerate(table.to_pylist(), start=1))


def read_cached_dataset(name: str, key: str) -> list[tuple[int, object]]:
    try:
        import datasets

        dataset = datasets.load_dataset(name, split="train")
    except Exception as error:  # datasets raises many unrelated types for "not there"; all mean the same here
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"{key}: {name!r} is neither a file nor a dataset in the local cache ({reason})") from None
    return list(enumerate(dataset, start=1))


def split_eval(rows: list[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """(train rows, eval rows): a seeded random `fraction` of the rows, at least one, held out.

    Both lists keep the original row order; only membership is random.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"eval fraction must be between 0 and 1, got {fraction}")
    eval_count = max(1, round(len(rows) * fraction))
    if eval_count >= len(rows):
        raise DataError(f"data.eval_fraction={fraction} of {len(rows)} rows leaves no rows to train on")
    held_out = set(random.Random(seed).sample(range(len(rows)), eval_count))
    train_rows = [row for index, row in enumerate(rows) if index not in held_out]
    eval_rows = [row for index, row in enumerate(rows) if index in held_out]
    return train_rows, eval_rows
