"""Byte counts as people write them (24GiB, 80GB) and as we print them (1.5 GiB)."""

from __future__ import annotations

import os
import re
from typing import Optional


def parse_bytes(text: str) -> int:
    """'24GiB', '80GB', '40 G', '1.5TiB' or a plain byte count -> bytes (GB = 1e9, GiB = 2**30)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*", str(text).lower())
    if not match:
        raise ValueError(f"{text!r} is not a size like 24GiB or 80GB")
    number, prefix, binary = match.groups()
    return int(float(number) * (1024 if binary else 1000) ** " kmgt".index(prefix or " "))


def format_bytes(count: Optional[float]) -> str:
    if count is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def file_size(path: os.PathLike) -> int:
    return os.stat(path).st_size
