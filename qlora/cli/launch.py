"""`qlora train --nproc N job.yaml ...`: torch.distributed.run with the same arguments, nothing more.

The launcher's agent runs in a thread of this process, so its workers are our children and
its result carries every rank's exit code: we exit with the ranks' code (75 after a SIGTERM,
so container retry policies keep working), where a bare `torchrun` exits 1 for any failure.
A SIGTERM / Ctrl-C here goes to the ranks at once (they agree to stop after the same step,
checkpoint, exit 75); the agent, which registers no signal handlers off the main thread,
only sees them exit. The ranks die with this process if it is killed outright.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from qlora.errors import EXIT_INTERNAL, EXIT_INTERRUPTED

LAUNCHER_ENV = "QLORA_LAUNCHER_PID"  # set for the ranks: they die with the launcher (cli.main)
# How long the agent waits for the remaining ranks after one failed before killing them:
# long enough for a step and a checkpoint of a large model.
SHUTDOWN_TIMEOUT_S = 600


def without_nproc(argv: list[str]) -> list[str]:
    """The command line the ranks run: ours minus --nproc N."""
    kept, skip = [], False
    for argument in argv:
        if skip:
            skip = False
        elif argument == "--nproc":
            skip = True
        elif not argument.startswith("--nproc="):
            kept.append(argument)
    return kept


def launch(nproc: int, argv: list[str]) -> int:
    """Run this program (`python -m qlora.cli`, or the module that called us) with `argv` minus
    --nproc on `nproc` local processes; their exit code."""
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # Its warning that it registers no signal handlers off the main thread: we handle them here.
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.ERROR)
    main_spec = getattr(sys.modules["__main__"], "__spec__", None)
    module = main_spec.name.removesuffix(".__main__") if main_spec else "qlora.cli"

    launcher_args = parse_args(
        [
            "--nproc-per-node",
            str(nproc),
            "--standalone",  # a free local port per job: two jobs on one box never collide
            "--shutdown-timeout",
            str(SHUTDOWN_TIMEOUT_S),
            "-m",
            module,
            *without_nproc(argv),
        ]
    )
    os.environ[LAUNCHER_ENV] = str(os.getpid())
    outcome: dict = {}

    def agent() -> None:
        try:
            run(launcher_args)
            outcome["code"] = 0
        except ChildFailedError as failed:
            outcome["code"] = ranks_code(failed)
        except BaseException as error:  # noqa: BLE001 - reported once below, as one line
            outcome["error"] = error

    thread = threading.Thread(target=agent, name="qlora-launcher")
    previous = {number: signal.signal(number, forward_to_ranks) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        thread.start()
        while thread.is_alive():
            thread.join(timeout=0.2)  # wake up for signals: Python runs handlers on the main thread only
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if "error" in outcome:
        error = outcome["error"]
        print(f"error: the launcher failed: {error.__class__.__name__}: {error}", file=sys.stderr)
        return EXIT_INTERNAL
    return outcome["code"]


def ranks_code(failed) -> int:
    """The ranks' exit code: the one they share, else the first failure's (signals as 128 + number)."""
    codes = sorted({failure.exitcode for failure in failed.failures.values()})
    if codes == [EXIT_INTERRUPTED]:
        return EXIT_INTERRUPTED
    _, first = failed.get_first_failure()
    return first.exitcode if first.exitcode >= 0 else 128 - first.exitcode


def forward_to_ranks(number, frame) -> None:
    """Pass a stop request to every rank (our child processes) as SIGTERM."""
    for pid in child_pids(os.getpid()):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def child_pids(parent: int) -> list[int]:
    """Processes whose parent is `parent` (Linux /proc)."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                # pid (comm) state ppid ...: comm may hold spaces, so split after its ')'.
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            children.append(int(entry))
    return children
