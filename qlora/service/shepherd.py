"""`python -m qlora.service.shepherd CMD...`: runs one job's command between the service and it.

Why a process in between: the kernel's parent-death signal (PR_SET_PDEATHSIG) is sent each time
a child is handed from a dying thread to another thread of the same process, so a job forked by
the multi-threaded service would get one SIGTERM per service thread when the service is killed,
and `qlora train` reads a second SIGTERM as "stop at once, no checkpoint". The shepherd is
single-threaded: when the service dies it is killed (SIGKILL, however many times), and the job
then gets exactly one SIGTERM, finishes its step, checkpoints and frees its output folder.

While the service lives, the shepherd forwards SIGTERM/SIGINT (cancel, shutdown) to the job and
ends the way the job ended (same exit code, or killed by the same signal). A job on several GPUs
is `qlora train --nproc N`, which forwards the signal to its ranks and ends with their code.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from qlora.service.process import die_with_parent


def main(command: list[str]) -> int:
    child = None
    pending = []

    def forward(number, frame) -> None:
        if child is None:
            pending.append(number)  # arrived before the job started: deliver it once it has
        else:
            child.send_signal(number)

    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, forward)
    child = subprocess.Popen(command, preexec_fn=die_with_parent(os.getpid(), signal.SIGTERM))
    for number in pending:
        child.send_signal(number)
    code = child.wait()
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
