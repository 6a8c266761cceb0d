"""Atomic checkpoints: written to a temp dir, fsynced, marked complete, renamed into place.

A reader only ever sees `checkpoints/step-NNNNNNNN/` folders that hold a COMPLETE marker; a
kill at any moment leaves at most a `.tmp-*` folder, which is never taken for a checkpoint.
Old checkpoints are deleted only after the new one is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

COMPLETE_MARKER = "COMPLETE"
PREFIX = "step-"


def save_checkpoint(root: Path, step: int, write: Callable[[Path], None], keep: int) -> Path:
    """Let `write(folder)` fill a fresh temp folder, then publish it as step-N and prune to `keep`."""
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{PREFIX}{step:08d}-", dir=root))
    try:
        write(staging)
        (staging / COMPLETE_MARKER).write_text(json.dumps({"step": step}))
        apply_umask(staging)
        fsync_tree(staging)
        final = root / f"{PREFIX}{step:08d}"
        if final.exists():
            shutil.rmtree(final)
        os.rename(staging, final)
        fsync_directory(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for old in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(old)
    return final


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first, sorted by step number (not by name or mtime)."""
    if not root.is_dir():
        return []
    found = [
        path
        for path in root.iterdir()
        if path.is_dir() and path.name.startswith(PREFIX) and path.name[len(PREFIX) :].isdigit() and (path / COMPLETE_MARKER).is_file()
    ]
    return sorted(found, key=lambda path: int(path.name[len(PREFIX) :]))


def apply_umask(folder: Path) -> None:
    """mkdtemp makes 0700 folders and safetensors writes 0600 files; give the published ones the
    permissions any other file of the user's gets, so a shared volume's readers can load them."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    fsync_directory(folder)


def fsync_directory(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
