"""A finished job's adapter as one download: a .tar.gz of its output folder without checkpoints."""

from __future__ import annotations

import os
import tarfile
import tempfile
from pathlib import Path

ARCHIVE_NAME = "adapter.tar.gz"
LEFT_OUT = ("checkpoints",)  # training state for resuming: large, and no use to the adapter's users


def adapter_archive(folder: Path, job_id: str) -> Path:
    """ROOT/jobs/<id>/adapter.tar.gz (built once: a succeeded job's output never changes); the
    archive's top folder is the job id, so unpacking two adapters never mixes their files."""
    archive = folder / ARCHIVE_NAME
    if archive.exists():
        return archive
    output = folder / "output"
    descriptor, temporary = tempfile.mkstemp(prefix=".adapter-", suffix=".tar.gz", dir=folder)
    os.close(descriptor)
    try:
        with tarfile.open(temporary, "w:gz") as tar:
            for path in sorted(output.iterdir()):
                if path.name in LEFT_OUT or path.name.startswith("."):
                    continue
                tar.add(path, arcname=f"{job_id}/{path.name}")
        os.replace(temporary, archive)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return archive


def adapter_record(folder: Path, view: dict) -> dict:
    adapter = folder / "output" / "adapter_model.safetensors"
    return {
        "job": view["id"],
        "name": view["name"],
        "finished": view["finished"],
        "adapter_bytes": adapter.stat().st_size,
        "eval_loss": view["eval_loss"],
        "download": f"/v1/jobs/{view['id']}/adapter",
    }
