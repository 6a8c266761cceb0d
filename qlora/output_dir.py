"""The output folder of a job: whose it is, whether it is finished or in use, atomic writes.

Every output dir holds an owner marker, written first: --overwrite deletes only folders that
hold it, so a mistyped output.dir (".", a home folder, a dataset folder) is never wiped. The
marker also carries the job's lock, and summary.json (written last) marks a finished run.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

from qlora.errors import OutputError
from qlora.sizes import format_bytes

FINISHED_MARKER = "summary.json"
OWNER_MARKER = ".qlora-run"


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Refuse a finished or foreign run unless --overwrite, or one in use; fail early if unwritable.

    An unfinished run of ours is fine: it is resumed from its newest checkpoint (or started over
    when it has none)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputError(f"output.dir: {output_dir} exists and is not a directory")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        if not (output_dir / OWNER_MARKER).exists():
            raise OutputError(
                f"output.dir: {output_dir} holds files qlora did not write; choose another output.dir "
                "(--overwrite only replaces qlora output folders)"
            )
        if in_use(output_dir):
            raise OutputError(f"output.dir: {output_dir} is in use by another running qlora job")
        if (output_dir / FINISHED_MARKER).exists() and not overwrite:
            raise OutputError(
                f"output.dir: {output_dir} already holds a finished run; "
                "pass --overwrite to replace it, or choose another output.dir"
            )
    existing = output_dir
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK):
        # The uid matters in a container: a volume is often owned by another uid than the image user.
        raise OutputError(f"output.dir: cannot write to {existing} as uid {os.getuid()}")


def unfinished(output_dir: Path) -> bool:
    return (output_dir / OWNER_MARKER).exists() and not (output_dir / FINISHED_MARKER).exists()


def in_use(output_dir: Path) -> bool:
    """Whether a running job holds the output dir's lock (see claim_output_dir).

    The trial lock is shared: only a claim's exclusive lock blocks it. With an exclusive trial,
    the ranks of one job checking the folder at the same moment saw each other's trial as a
    running job."""
    with open(output_dir / OWNER_MARKER, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


@contextmanager
def claim_output_dir(output_dir: Path, wipe: bool):
    """Create (or, with wipe, recreate) the output dir and hold an exclusive lock on it for the
    job's lifetime: two jobs writing one folder would interleave checkpoints and metrics. The
    lock is an flock on the owner marker, so it dies with the process, even on kill -9."""
    if wipe and output_dir.is_dir():
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / OWNER_MARKER, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(f"output.dir: {output_dir} is in use by another running qlora job") from None
        if handle.tell() == 0:
            handle.write("written by qlora: `qlora train --overwrite` may replace this folder\n")
            handle.flush()
        yield


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def apply_umask(folder: Path) -> None:
    """mkdtemp makes 0700 folders and safetensors writes 0600 files; give the published ones the
    permissions any other file of the user's gets, so a shared volume's readers can load them."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


@contextmanager
def disk_full_explained(
    what: str, folder: Path, last_good: Callable[[], Optional[Path]], needed: Optional[Callable[[], int]] = None
):
    """A full disk (or quota) while writing `what` into `folder`, as one OutputError (exit 4)
    instead of an unexpected OSError: what was being written, where, about how much it needs and
    how much is free, and the checkpoint a rerun resumes from. The writers remove their own
    partial temp folders, so the space they took is free again."""
    try:
        yield
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        free = shutil.disk_usage(folder if folder.exists() else folder.parent).free
        last = last_good()
        then = (
            f"the last complete checkpoint is {last}: free space and rerun to resume from it"
            if last
            else "no complete checkpoint yet: a rerun starts over"
        )
        needs = f"it needs about {format_bytes(needed())}, " if needed else ""
        raise OutputError(
            f"no space left on device writing {what} to {folder}: {needs}{format_bytes(free)} free; {then}"
        ) from None
