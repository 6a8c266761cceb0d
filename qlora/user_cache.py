"""The user's cache folder for what qlora can rebuild but should not redo every run (tokenized
data sets, the device's measured peak FLOP rate): never inside the package or the output dir."""

from __future__ import annotations

import json
import os
from pathlib import Path


def cache_dir() -> Path:
    """$QLORA_CACHE_DIR, else $XDG_CACHE_HOME/qlora, else ~/.cache/qlora."""
    if os.environ.get("QLORA_CACHE_DIR"):
        return Path(os.environ["QLORA_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qlora"


def write_json_atomically(path: Path, record) -> None:
    """Temp file + rename: a concurrent reader sees the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(record))
    os.replace(temporary, path)
