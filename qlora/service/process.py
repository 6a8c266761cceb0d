"""How the service starts `qlora` subprocesses: same interpreter, same qlora code, the GPUs of
its slots only, and never outliving the service while holding a job's output folder."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from pathlib import Path
from typing import Optional

import qlora

# `python -m <module> train job.yaml`; tests point it at tests.cli_with_faults to slow steps down.
CLI_MODULE = "qlora.cli"
# What torchrun starts on each rank: the CLI, run by a wrapper that keeps the rank's exit code.
RANK_MODULE = "qlora.service.ranks"
PR_SET_PDEATHSIG = 1


def qlora_command(*args: str) -> list[str]:
    return [sys.executable, "-m", CLI_MODULE, *args]


def train_command(job_file: str, gpus: int, stop_grace_s: float) -> list[str]:
    """`qlora train job.yaml` for one GPU; for N, the same command on N ranks under torch.distributed.run
    (torchrun), which the training side runs as DDP or FSDP (train.distributed)."""
    if gpus == 1:
        return qlora_command("train", job_file)
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        # A rendezvous of its own on localhost, on a port the kernel picks at bind time: jobs that
        # start side by side can neither race for a port nor join each other.
        "--standalone",
        "--nproc-per-node",
        str(gpus),
        # The service decides when a job runs again (it resumes from its checkpoint), not torchrun.
        "--max-restarts",
        "0",
        # After SIGTERM, torchrun SIGKILLs the ranks still running after this (its default is 30 s, too short
        # for a large checkpoint); a little under the service's grace, so that torchrun, not a second signal
        # from the service that would find torchrun already shutting down, ends a rank that cannot stop.
        "--shutdown-timeout",
        str(max(1, int(stop_grace_s) - 5)),
        "-m",
        RANK_MODULE,
        CLI_MODULE,
        "train",
        job_file,
    ]


def child_environment(device: Optional[str]) -> dict:
    """The service's environment, plus the GPUs this child may see ("0" or "2,3": its slots) and the
    path to this qlora (a child started in its job folder would otherwise import whichever qlora is
    installed)."""
    package_parent = str(Path(qlora.__file__).resolve().parents[1])
    paths = [package_parent, *[part for part in os.environ.get("PYTHONPATH", "").split(os.pathsep) if part]]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths)), "PYTHONUNBUFFERED": "1"}
    if device is not None:
        environment["CUDA_VISIBLE_DEVICES"] = device
    return environment


def shepherded(command: list[str], rank_codes: Optional[Path] = None) -> list[str]:
    """The command behind a single-threaded shepherd process (see qlora/service/shepherd.py); with
    rank_codes, a torchrun command whose ranks leave their exit codes there (qlora/service/ranks.py)."""
    options = ["--rank-codes", str(rank_codes)] if rank_codes is not None else []
    return [sys.executable, "-m", "qlora.service.shepherd", *options, *command]


def die_with_parent(parent_pid: int, number: int = signal.SIGTERM):
    """A preexec_fn: the kernel sends the child `number` when its parent dies, even by SIGKILL.

    The signal follows the death of the thread that forked the child, and is sent again each
    time the child passes to another thread of a dying process: the service forks shepherds
    (which die by SIGKILL, any number of times) and a shepherd forks the job (one SIGTERM)."""

    def preexec() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, number, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os.kill(os.getpid(), number)

    return preexec
