"""The job records, in SQLite under the service root: what was submitted survives any restart.

One connection shared by the HTTP threads and the scheduler thread, behind a lock (SQLite
serialises writers anyway); WAL mode so a reader never waits for the disk sync of a writer.
Every state change is one transaction that checks the state it leaves, so a cancel and the
scheduler racing on the same job cannot both win.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

# queued: waiting for a slot. running: its `qlora train` process is alive. interrupted: it was
# running when the service stopped; it resumes from its checkpoint before newer queued jobs.
STATES = ("queued", "running", "succeeded", "failed", "cancelled", "interrupted")
WAITING = ("queued", "interrupted")
FINISHED = ("succeeded", "failed", "cancelled")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    name TEXT,
    state TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    total_steps INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    exit_code INTEGER,
    error TEXT,
    pid INTEGER,
    slot TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    gpus INTEGER NOT NULL DEFAULT 1,
    notes TEXT
)
"""
# Columns added since the first release, for a service.db an older service created.
ADDED_COLUMNS = {"gpus": "INTEGER NOT NULL DEFAULT 1", "notes": "TEXT"}


@dataclass
class Job:
    id: str
    name: Optional[str]
    state: str
    priority: int
    created: float
    started: Optional[float]
    finished: Optional[float]
    total_steps: Optional[int]
    attempts: int
    exit_code: Optional[int]
    error: Optional[str]
    pid: Optional[int]
    slot: Optional[str]
    """The CUDA_VISIBLE_DEVICES of its slots while it runs ("0", or "0,1" for a job on two GPUs)."""
    cancel_requested: int
    gpus: int = 1
    """The world size: how many GPU slots (torchrun processes) the job runs on."""
    notes: Optional[str] = None
    """A JSON list of what the service changed in the submitted config (e.g. where the output goes)."""

    def record(self) -> dict:
        return {**asdict(self), "notes": json.loads(self.notes) if self.notes else []}


class Store:
    def __init__(self, path: Path):
        self.lock = threading.Lock()
        self.connection = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.connection.row_factory = sqlite3.Row
        with self.lock:
            self.connection.execute("PRAGMA journal_mode=WAL")
            self.connection.execute("PRAGMA synchronous=FULL")  # a 201 means the job is on disk
            self.connection.execute(SCHEMA)
            present = {row["name"] for row in self.connection.execute("PRAGMA table_info(jobs)")}
            for name, declaration in ADDED_COLUMNS.items():
                if name not in present:
                    self.connection.execute(f"ALTER TABLE jobs ADD COLUMN {name} {declaration}")

    def add(
        self,
        job_id: str,
        name: Optional[str],
        priority: int,
        total_steps: Optional[int],
        gpus: int = 1,
        notes: tuple[str, ...] = (),
    ) -> Job:
        with self.lock:
            self.connection.execute(
                "INSERT INTO jobs (id, name, state, priority, created, total_steps, gpus, notes)"
                " VALUES (?, ?, 'queued', ?, ?, ?, ?, ?)",
                (job_id, name, priority, time.time(), total_steps, gpus, json.dumps(list(notes))),
            )
        return self.get(job_id)

    def get(self, job_id: str) -> Optional[Job]:
        with self.lock:
            row = self.connection.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job(**dict(row)) if row else None

    def list(self, states: tuple[str, ...] = STATES) -> list[Job]:
        marks = ",".join("?" * len(states))
        with self.lock:
            rows = self.connection.execute(
                f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY created, id", states
            ).fetchall()
        return [Job(**dict(row)) for row in rows]

    def waiting(self) -> list[Job]:
        """Jobs ready to run, in the order they get a slot: priority first, then oldest first."""
        with self.lock:
            rows = self.connection.execute(
                "SELECT * FROM jobs WHERE state IN ('queued', 'interrupted') ORDER BY priority DESC, created, id"
            ).fetchall()
        return [Job(**dict(row)) for row in rows]

    def transition(self, job_id: str, leaving: tuple[str, ...], state: str, **fields) -> bool:
        """Move a job to `state` if it is in one of `leaving`; False (and nothing written) if not."""
        assert state in STATES
        columns = ", ".join(f"{name} = ?" for name in ["state", *fields])
        marks = ",".join("?" * len(leaving))
        with self.lock:
            self.connection.execute("BEGIN IMMEDIATE")
            try:
                cursor = self.connection.execute(
                    f"UPDATE jobs SET {columns} WHERE id = ? AND state IN ({marks})",
                    (state, *fields.values(), job_id, *leaving),
                )
                self.connection.execute("COMMIT")
            except BaseException:
                self.connection.execute("ROLLBACK")
                raise
        return cursor.rowcount == 1

    def request_cancel(self, job_id: str) -> bool:
        with self.lock:
            cursor = self.connection.execute(
                "UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND state = 'running'", (job_id,)
            )
        return cursor.rowcount == 1

    def close(self) -> None:
        with self.lock:
            self.connection.close()
