"""`qlora serve`: the sub-parser and the start-up (root, lock, token, GPU slots, uvicorn).

fastapi and uvicorn are imported only here, when the service starts: `qlora train` runs
without the `serve` extra installed."""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

from qlora.cli.commands import command_parser
from qlora.errors import ConfigError, OutputError, QloraError
from qlora.service.process import CPU_SLOT

LOCK_FILE = ".service.lock"


def add_serve_command(commands) -> None:
    serve = command_parser(commands, "serve", "run the training service: a job queue over HTTP with a web page")
    serve.add_argument(
        "--root", required=True, help="folder for the job database, uploads, jobs and adapters (created if missing)"
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--gpus",
        type=int,
        default=None,
        help="GPU slots (default: the visible GPUs, or 1 without a GPU); a job takes the number it asks for",
    )
    serve.add_argument(
        "--allow-remote-code", action="store_true", help="accept jobs with model.trust_remote_code: true"
    )
    serve.add_argument(
        "--max-upload-mb", type=float, default=100.0, help="largest upload accepted, in MiB (default 100)"
    )
    serve.add_argument(
        "--stop-grace",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="on shutdown, how long a running job may take to finish its step and checkpoint (default 300)",
    )


def run_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from qlora.service.app import Settings, create_app
    except ImportError as error:
        raise QloraError(
            f"qlora serve needs the serve extra ({error.name} is missing): pip install 'qlora[serve]'"
        ) from None
    from qlora.service.security import load_or_create_token

    slots = gpu_slots(args.gpus)  # every flag checked before anything is written
    root = Path(args.root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    lock = claim_root(root)
    token = load_or_create_token(root, echo=lambda line: print(line, file=sys.stderr, flush=True))
    settings = Settings(
        root=root,
        token=token,
        slots=slots,
        allow_remote_code=args.allow_remote_code,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        stop_grace_s=args.stop_grace,
    )
    app = create_app(settings, echo=lambda line: print(line, file=sys.stderr, flush=True))
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"note: listening on {args.host}: plain HTTP, put TLS in front of it before it leaves a trusted network",
            file=sys.stderr,
        )
    print(
        f"qlora serve: http://{args.host}:{args.port}/ ({len(slots)} slot(s): {', '.join(slots)}; root {root})",
        file=sys.stderr,
        flush=True,
    )
    # Open event streams must not hold a shutdown back for long: 5 s, then the jobs get to checkpoint.
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    lock.close()
    return 0


def claim_root(root: Path):
    """Two services on one root would each start the same queued jobs: hold an flock for life."""
    handle = open(root / LOCK_FILE, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise OutputError(f"--root: {root} is in use by another qlora serve") from None
    return handle


def gpu_slots(count: Optional[int]) -> list[str]:
    """The CUDA_VISIBLE_DEVICES value of each slot: the GPUs this service may use, one process each.
    Without a GPU (none present, or hidden by the operator's CUDA_VISIBLE_DEVICES "" or -1), --gpus N
    still runs N processes at once on the CPU (a 2-slot job there is 2 gloo ranks): slots cpu0,
    cpu1, ..., which hand a child no GPU."""
    visible = visible_gpus()
    if count is None:
        count = max(len(visible), 1)
    if count < 1:
        raise ConfigError(f"--gpus: {count}: needs at least 1")
    if visible and count > len(visible):
        raise ConfigError(f"--gpus: {count}: only {len(visible)} GPU(s) visible ({', '.join(visible)})")
    return visible[:count] if visible else [f"{CPU_SLOT}{index}" for index in range(count)]


def visible_gpus() -> list[str]:
    """From $CUDA_VISIBLE_DEVICES when set (as CUDA reads it: up to the first invalid entry, so ""
    and "-1" hide every GPU), else from nvidia-smi: no torch (and no CUDA context) in the service."""
    declared = os.environ.get("CUDA_VISIBLE_DEVICES")
    if declared is not None:
        kept = []
        for part in (part.strip() for part in declared.split(",")):
            if not part or part.startswith("-"):
                break
            kept.append(part)
        return kept
    if shutil.which("nvidia-smi") is None:
        return []
    return slots_from_listing(subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout)


def slots_from_listing(listing: str) -> list[str]:
    """`nvidia-smi -L`'s devices as CUDA_VISIBLE_DEVICES values: a GPU's index (the children get
    CUDA_DEVICE_ORDER=PCI_BUS_ID, so CUDA numbers GPUs in nvidia-smi's order), or, for a GPU split
    into MIG instances, each instance's MIG UUID (a MIG instance is addressed by UUID only)."""
    slots: list[str] = []
    for line in listing.splitlines():
        if line.startswith("GPU "):
            slots.append(line.split(":", 1)[0].split()[1])
        elif line.strip().startswith("MIG ") and "(UUID: " in line and slots:
            uuid = line.split("(UUID: ", 1)[1].rstrip(")").strip()
            if not slots[-1].startswith("MIG-"):
                slots.pop()  # the whole GPU is not usable once it is split
            slots.append(uuid)
    return slots
