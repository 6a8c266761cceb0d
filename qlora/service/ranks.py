"""The exit code of a job on several GPUs: each rank's own, which torchrun does not pass on.

torch.distributed.run exits 1 whenever a rank exits non-zero (75, "interrupted with a checkpoint",
included), and when it is stopped by SIGTERM it forwards the signal, waits for the ranks, and exits
1 too. The service reads the exit code (qlora/service/runner.py), so torchrun starts each rank as

    python -m qlora.service.ranks MODULE ARGS...    (MODULE ARGS: qlora.cli train job.yaml)

which runs `python -m MODULE ARGS` in this same process and leaves the rank's exit code in
$QLORA_RANK_CODES/<RANK>. The shepherd (qlora/service/shepherd.py) reads them back when torchrun
has ended and ends with `launcher_code`: what the ranks said, as if one process had run.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
from pathlib import Path
from typing import Optional

from qlora.errors import EXIT_ABORTED, EXIT_INTERNAL, EXIT_INTERRUPTED

RANK_CODES_ENV = "QLORA_RANK_CODES"
STOPPED = (EXIT_INTERRUPTED, EXIT_ABORTED)


def main(argv: list[str]) -> int:
    module, *args = argv
    sys.argv = [module, *args]  # runpy replaces argv[0] with the module's file, as `python -m` does
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exit:
        code = exit_status(exit.code)
    except BaseException:
        record(1)  # an uncaught exception: Python prints it and exits 1
        raise
    record(code)
    return code


def exit_status(code) -> int:
    """SystemExit's argument as the process's exit status, as Python's own exit would make it."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def record(code: int) -> None:
    folder = os.environ.get(RANK_CODES_ENV)
    if not folder:
        return  # run by hand, not by the service
    target = Path(folder) / os.environ.get("RANK", "0")
    partial = target.with_name(f".{target.name}.partial")
    partial.write_text(str(code))
    os.replace(partial, target)  # the shepherd never reads half a number


def read_codes(folder: Path) -> dict[int, int]:
    if not folder.is_dir():
        return {}
    return {int(path.name): int(path.read_text()) for path in folder.iterdir() if path.name.isdigit()}


def launcher_code(launcher: int, ranks: dict[int, int], signalled: bool) -> int:
    """One exit code for the job, from torchrun's (`launcher`) and the ranks' (`ranks`: rank -> code).

    A rank's own error wins: the others were stopped because of it. qlora's errors (2-7) come before
    1, which is also what a rank exits with when a collective fails under it because another rank
    died; then the lowest rank's. Else rank 0's 75 or 130: it alone writes checkpoints, so it says
    whether one was written. Else, when the service had asked the job to stop, the job counts as
    stopped by SIGTERM, like one process killed before it could checkpoint; else torchrun's own
    code (e.g. a rank killed by a signal)."""
    if launcher == 0:
        return 0
    errors = sorted((code == EXIT_INTERNAL, rank, code) for rank, code in ranks.items() if code not in (0, *STOPPED))
    if errors:
        return errors[0][2]
    if ranks.get(0) in STOPPED:
        return ranks[0]
    return -signal.SIGTERM if signalled else launcher


def clear(folder: Optional[Path]) -> None:
    """Codes left by an earlier attempt must not speak for this one."""
    if folder is None:
        return
    folder.mkdir(parents=True, exist_ok=True)
    for path in folder.iterdir():
        path.unlink()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
