"""What produced a file: its content hash and the library versions, for the records written
next to checkpoints (resume) and adapters (the compatibility manifest)."""

from __future__ import annotations

import hashlib
import platform
from importlib import metadata
from pathlib import Path

LIBRARIES = ("qlora", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "safetensors")


def library_versions() -> dict:
    """{"python": ..., library: version or None} for the libraries that decide the numbers."""
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
