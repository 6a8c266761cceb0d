"""Uploads: data (and model) files a client sends, kept under ROOT/files/ and named in configs
as `files/<path>`.

The body is streamed to a temporary file and counted as it comes: past the size limit the
upload stops with 413 and nothing is kept (the whole body is never held in memory). A file
appears under its name only once complete (rename), and is never replaced unless asked.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import AsyncIterator

from qlora.service.security import PathRejected, inside_root

FILES_FOLDER = "files"


class UploadRejected(ValueError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def file_path(root: Path, relative: str) -> Path:
    """ROOT/files/<relative>, confined to that folder and not a folder itself (else a 400)."""
    try:
        path = inside_root(root / FILES_FOLDER, relative, "path")
    except PathRejected as error:
        raise UploadRejected(400, str(error)) from None
    if path.is_dir():
        raise UploadRejected(400, f"path: {relative}: is a folder")
    return path


def upload_target(root: Path, relative: str, overwrite: bool) -> Path:
    target = file_path(root, relative)
    if target.exists() and not overwrite:
        raise UploadRejected(409, f"path: {relative}: already exists; pass ?overwrite=true to replace it")
    return target


async def receive_upload(chunks: AsyncIterator[bytes], target: Path, limit: int) -> dict:
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=".upload-", dir=target.parent)
    digest, size = hashlib.sha256(), 0
    try:
        with os.fdopen(descriptor, "wb") as handle:
            async for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise UploadRejected(413, f"upload: over the limit of {limit} bytes")
                digest.update(chunk)
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o644)  # mkstemp makes 0600; an uploaded file is as readable as any other
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return {"bytes": size, "sha256": digest.hexdigest()}


def read_text_file(root: Path, relative: str, limit: int) -> str:
    """ROOT/files/<relative> as text: 404 if it is not there, 400 if a folder, too large or not UTF-8."""
    path = file_path(root, relative)
    if not path.is_file():
        raise UploadRejected(404, f"path: {relative}: no such file under {FILES_FOLDER}/")
    if path.stat().st_size > limit:
        raise UploadRejected(400, f"path: {relative}: {path.stat().st_size} bytes is over the limit of {limit} bytes")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UploadRejected(400, f"path: {relative}: not a UTF-8 text file") from None


def list_files(root: Path) -> list[dict]:
    base = root / FILES_FOLDER
    if not base.is_dir():
        return []
    return [
        {"path": str(path.relative_to(root)), "bytes": path.stat().st_size}
        for path in sorted(base.rglob("*"))
        if path.is_file()
        and not path.is_symlink()
        and not path.name.startswith(".upload-")  # a link may lead out of the root
    ]
