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
PR_SET_PDEATHSIG = 1


def qlora_command(*args: str) -> list[str]:
    return [sys.executable, "-m", CLI_MODULE, *args]


def train_command(job_file: str, gpus: int) -> list[str]:
    """`qlora train job.yaml` for one GPU; for N, `qlora train --nproc N job.yaml`: torch.distributed.run
    on N local ranks (DDP or FSDP, train.distributed), exiting with the ranks' code (qlora/cli/launch.py)
    where a bare torchrun exits 1 for a checkpointed stop too."""
    if gpus == 1:
        return qlora_command("train", job_file)
    return qlora_command("train", job_file, "--nproc", str(gpus))


CPU_SLOT = "cpu"  # the name of a slot without a GPU (qlora serve's cpu0, cpu1, ...)


def child_environment(device: Optional[str]) -> dict:
    """The service's environment, plus the GPUs this child may see ("0" or "2,3": its slots; cpu
    slots change nothing, so GPUs the operator hid stay hidden) and the path to this qlora (a child
    started in its job folder would otherwise import whichever qlora is installed)."""
    package_parent = str(Path(qlora.__file__).resolve().parents[1])
    paths = [package_parent, *[part for part in os.environ.get("PYTHONPATH", "").split(os.pathsep) if part]]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths)), "PYTHONUNBUFFERED": "1"}
    if device is not None and not device.startswith(CPU_SLOT):  # cpu slots: the GPUs stay as the operator left them
        environment["CUDA_VISIBLE_DEVICES"] = device
        environment["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # the numbering of nvidia-smi, which named the slots
    return environment


def shepherded(command: list[str]) -> list[str]:
    """The command behind a single-threaded shepherd process (see qlora/service/shepherd.py)."""
    return [sys.executable, "-m", "qlora.service.shepherd", *command]


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
