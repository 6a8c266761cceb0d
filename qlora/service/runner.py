"""The scheduler: `qlora train` subprocesses on the GPU slots, FIFO within priority.

A job asks for `gpus` slots (1 by default; N runs under torchrun on N ranks, see process.py). The
queue is strict: the first waiting job that does not fit reserves the free slots, and no job
behind it starts until it has started, so a 4-GPU job is not starved by 1-GPU jobs that keep
taking each slot as it frees (the service cannot know how long a job runs, so it never lets a
smaller one jump ahead). A job of higher priority still goes first: that is what priority asks for.

A job's process is its own session (a Ctrl-C at the service's terminal must not reach it: the
service decides when a job stops), runs behind a shepherd process (qlora/service/shepherd.py)
and gets one SIGTERM from the kernel if the service dies. The exit code says what happened:
  0                         succeeded
  75 / 130 after a cancel   cancelled (75: a checkpoint of the last step is kept)
  75 / 130 / SIGTERM while the service stops, or 75 from an outside SIGTERM
                            interrupted: it resumes from its checkpoint when a slot is free
  anything else             failed, with the CLI's `error:` line
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from qlora.errors import EXIT_ABORTED, EXIT_INTERRUPTED
from qlora.output_dir import FINISHED_MARKER, OWNER_MARKER, in_use
from qlora.service.process import child_environment, die_with_parent, shepherded, train_command
from qlora.service.store import Job, Store
from qlora.service.submission import job_folder, last_error_line

STOPPED_CODES = (EXIT_INTERRUPTED, EXIT_ABORTED, -signal.SIGTERM)
ERROR_TAIL_BYTES = 64 * 1024


@dataclass
class Child:
    job_id: str
    slots: list[str]
    process: subprocess.Popen
    log: object


class Runner:
    def __init__(
        self,
        store: Store,
        root: Path,
        slots: list[str],
        stop_grace_s: float = 300.0,
        lock_wait_s: float = 600.0,
        poll_s: float = 0.2,
        echo: Callable[[str], None] = print,
    ):
        self.store, self.root, self.slots = store, root, slots
        self.stop_grace_s, self.lock_wait_s, self.poll_s, self.echo = stop_grace_s, lock_wait_s, poll_s, echo
        self.children: dict[str, Child] = {}
        self.children_lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.locked_since: dict[str, float] = {}
        self.thread = threading.Thread(target=self.loop, name="qlora-scheduler", daemon=True)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self.recover()
        self.thread.start()

    def stop(self) -> None:
        """Ask every job to checkpoint and wait for them (they resume at the next start)."""
        self.stopping.set()
        self.wake.set()
        self.thread.join()

    def recover(self) -> None:
        """Jobs the store says are running belong to a service that died: they resume."""
        for job in self.store.list(("running",)):
            self.store.transition(job.id, ("running",), "interrupted", pid=None, slot=None)
            self.echo(f"job {job.id}: was running when the service stopped; it will resume from its checkpoint")

    def loop(self) -> None:
        # The children are forked from this thread and it outlives them (PDEATHSIG follows it).
        while not self.stopping.is_set():
            try:
                self.reap()
                self.schedule()
            except Exception as error:  # noqa: BLE001 - one bad job record must not stop the queue for all
                self.echo(f"scheduler: {error.__class__.__name__}: {error}")
            self.wake.wait(self.poll_s)
            self.wake.clear()
        self.stop_children()

    # ------------------------------------------------------------------ scheduling

    def free_slots(self) -> list[str]:
        with self.children_lock:
            busy = {slot for child in self.children.values() for slot in child.slots}
        return [slot for slot in self.slots if slot not in busy]

    def schedule(self) -> None:
        free = self.free_slots()
        for job in [job for job in self.store.waiting() if not self.never_fits(job)]:
            if job.gpus > len(free):
                return  # it reserves the free slots: see the module's docstring
            if self.output_locked(job) or self.finished_meanwhile(job):
                continue
            if self.launch(job, free[: job.gpus]):
                del free[: job.gpus]

    def never_fits(self, job: Job) -> bool:
        """Submitting refuses such a job, but the service may have restarted with fewer --gpus since:
        it fails rather than hold the queue forever."""
        if job.gpus <= len(self.slots):
            return False
        self.store.transition(
            job.id,
            ("queued", "interrupted"),
            "failed",
            finished=time.time(),
            error=f"gpus: {job.gpus}: this service has {len(self.slots)} GPU slot(s) now",
        )
        return True

    def output_locked(self, job: Job) -> bool:
        """A process from before a service crash may still hold the output folder while it writes
        its checkpoint; wait for it (up to lock_wait_s) rather than start a second writer."""
        output = job_folder(self.root, job.id) / "output"
        if not (output / OWNER_MARKER).exists() or not in_use(output):
            self.locked_since.pop(job.id, None)
            return False
        since = self.locked_since.setdefault(job.id, time.monotonic())
        if time.monotonic() - since > self.lock_wait_s:
            self.store.transition(
                job.id,
                ("queued", "interrupted"),
                "failed",
                finished=time.time(),
                error=f"output folder still in use by another process after {self.lock_wait_s:.0f} s",
            )
            self.locked_since.pop(job.id, None)
        return True

    def finished_meanwhile(self, job: Job) -> bool:
        """A job the service lost while it wrote its adapter may have finished on its own: rerunning
        `qlora train` on a finished output folder would fail, and there is nothing left to do."""
        if not (job_folder(self.root, job.id) / "output" / FINISHED_MARKER).exists():
            return False
        self.store.transition(job.id, ("queued", "interrupted"), "succeeded", finished=time.time(), exit_code=0)
        self.echo(f"job {job.id}: had finished while the service was down")
        return True

    def launch(self, job: Job, slots: list[str]) -> bool:
        folder = job_folder(self.root, job.id)
        attempt = job.attempts + 1
        devices = ",".join(slots)  # CUDA_VISIBLE_DEVICES: local rank i uses the i-th of them
        if not self.store.transition(
            job.id,
            ("queued", "interrupted"),
            "running",
            started=job.started or time.time(),
            attempts=attempt,
            slot=devices,
            cancel_requested=0,
        ):
            return False  # cancelled between the listing and now
        try:
            log = open(folder / "log.txt", "ab")
            resumes = " (resumes from its checkpoint)" if attempt > 1 else ""
            where = f"slots {devices} ({len(slots)} processes)" if len(slots) > 1 else f"slot {devices}"
            log.write(f"== qlora serve: attempt {attempt} on {where}{resumes}\n".encode())
            log.flush()
            process = subprocess.Popen(
                shepherded(train_command(str(folder / "job.yaml"), len(slots))),
                cwd=folder,
                env=child_environment(devices),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent(os.getpid(), signal.SIGKILL),
            )
        except OSError as error:
            self.store.transition(
                job.id, ("running",), "failed", finished=time.time(), slot=None, error=f"cannot start the job: {error}"
            )
            return False
        with self.children_lock:
            self.children[job.id] = Child(job.id, slots, process, log)
        self.store.transition(job.id, ("running",), "running", pid=process.pid)
        if self.store.get(job.id).cancel_requested:
            process.send_signal(signal.SIGTERM)  # a cancel landed before the child was registered
        self.echo(f"job {job.id}: started on slot(s) {devices} (pid {process.pid}, attempt {attempt})")
        return True

    def reap(self, stopping: bool = False) -> None:
        with self.children_lock:
            done = [child for child in self.children.values() if child.process.poll() is not None]
            for child in done:
                del self.children[child.job_id]
        for child in done:
            child.log.close()
            self.finish(child.job_id, child.process.returncode, stopping)
        if done:
            self.wake.set()  # a slot is free: look at the queue again at once

    def finish(self, job_id: str, code: int, stopping: bool) -> None:
        job = self.store.get(job_id)
        fields = dict(exit_code=code, pid=None, slot=None)
        if code == 0:
            state, fields["finished"] = "succeeded", time.time()
        elif job.cancel_requested and code in STOPPED_CODES:
            state, fields["finished"] = "cancelled", time.time()
        elif (stopping and code in STOPPED_CODES) or code == EXIT_INTERRUPTED:
            state = "interrupted"
        else:
            state, fields["finished"] = "failed", time.time()
            fields["error"] = self.error_line(job_id, code)
        self.store.transition(job_id, ("running",), state, **fields)
        self.echo(f"job {job_id}: {state} (exit {code})")

    def error_line(self, job_id: str, code: int) -> str:
        log = job_folder(self.root, job_id) / "log.txt"
        with open(log, "rb") as handle:
            handle.seek(max(0, log.stat().st_size - ERROR_TAIL_BYTES))
            tail = handle.read().decode("utf-8", "replace")
        if code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return last_error_line(tail) or f"qlora train exited {code} (see the job's log)"

    # ------------------------------------------------------------------ requests

    def cancel(self, job_id: str) -> Optional[str]:
        """A waiting job is cancelled at once; a running one is asked to checkpoint and stop."""
        if self.store.transition(job_id, ("queued", "interrupted"), "cancelled", finished=time.time()):
            return "cancelled"
        if self.store.request_cancel(job_id):
            with self.children_lock:
                child = self.children.get(job_id)
            if child is not None and child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
            return "cancelling"
        job = self.store.get(job_id)
        return job.state if job else None

    def stop_children(self) -> None:
        with self.children_lock:
            children = list(self.children.values())
        for child in children:
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_grace_s
        for child in children:
            try:
                child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.echo(f"job {child.job_id}: no checkpoint within {self.stop_grace_s:.0f} s; stopping it at once")
                child.process.send_signal(signal.SIGTERM)  # the second signal: stop now
                child.process.wait()
        self.reap(stopping=True)
