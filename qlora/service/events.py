"""What a client sees of a job: its record plus its progress (read from metrics.jsonl), and the
server-sent event stream of its metrics rows and log lines.

An event's id is `<metrics byte offset>-<log byte offset>`: a client that reconnects with
Last-Event-ID gets exactly what it missed. A resumed run may rewind metrics.jsonl to its
checkpoint; an offset that no longer falls on a line start restarts from the top (rows carry
their step, so a client keeps the newest row per step).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import AsyncIterator, Callable, Optional

from qlora.service.store import FINISHED, Job

TAIL_BYTES = 64 * 1024
HEARTBEAT_S = 15.0


def job_view(job: Job, folder: Path) -> dict:
    rows = tail_rows(folder / "output" / "metrics.jsonl")
    trained = [row for row in rows if "loss" in row]
    evaluated = [row for row in rows if row.get("eval_loss") is not None]
    view = job.record()
    view.update(
        step=rows[-1]["step"] if rows else 0,
        latest=trained[-1] if trained else None,
        eval_loss=evaluated[-1]["eval_loss"] if evaluated else None,
        adapter=(folder / "output" / "adapter_model.safetensors").exists() and job.state == "succeeded",
    )
    return view


def tail_rows(path: Path) -> list[dict]:
    """The last rows of a metrics.jsonl (whole lines only; a line being written is skipped)."""
    if not path.exists():
        return []
    with open(path, "rb") as handle:
        size = handle.seek(0, 2)
        handle.seek(max(0, size - TAIL_BYTES))
        text = handle.read().decode("utf-8", "replace")
    lines = text.split("\n")[1 if size > TAIL_BYTES else 0 : -1]
    return [json.loads(line) for line in lines if line.strip()]


def parse_event_id(text: Optional[str]) -> tuple[int, int]:
    try:
        metrics, log = (int(part) for part in (text or "").split("-"))
        return max(metrics, 0), max(log, 0)
    except ValueError:
        return 0, 0


def read_lines(path: Path, offset: int) -> tuple[list[str], int]:
    """Whole lines from `offset` on, and the offset after the last whole line."""
    if not path.exists():
        return [], 0
    with open(path, "rb") as handle:
        size = handle.seek(0, 2)
        if offset > size or (offset > 0 and not starts_line(handle, offset)):
            offset = 0
        handle.seek(offset)
        chunk = handle.read()
    end = chunk.rfind(b"\n") + 1
    return chunk[:end].decode("utf-8", "replace").split("\n")[:-1], offset + end


def starts_line(handle, offset: int) -> bool:
    handle.seek(offset - 1)
    return handle.read(1) == b"\n"


def sse(event: str, data: dict, event_id: Optional[str] = None) -> str:
    head = f"id: {event_id}\n" if event_id else ""
    return f"{head}event: {event}\ndata: {json.dumps(data)}\n\n"


async def event_stream(
    load_job: Callable[[], Optional[Job]],
    folder: Path,
    last_event_id: Optional[str],
    disconnected: Callable,
    poll_s: float = 0.5,
) -> AsyncIterator[str]:
    """state, metrics and log events until the job is finished and every line is sent; then end."""
    metrics_offset, log_offset = parse_event_id(last_event_id)
    last_state, idle = None, 0.0
    while not await disconnected():
        job = load_job()
        if job is None:
            return
        rows, metrics_offset = read_lines(folder / "output" / "metrics.jsonl", metrics_offset)
        lines, log_offset = read_lines(folder / "log.txt", log_offset)
        event_id = f"{metrics_offset}-{log_offset}"
        for row in rows:
            if row.strip():
                yield sse("metrics", json.loads(row), event_id)
        for line in lines:
            # A progress bar redraws with carriage returns: each redraw is a line of its own.
            for part in line.split("\r"):
                if part.strip():
                    yield sse("log", {"line": part}, event_id)
        if job.state != last_state:
            last_state = job.state
            yield sse("state", job_view(job, folder), event_id)
        if job.state in FINISHED and not rows and not lines:
            yield sse("end", job_view(job, folder), event_id)
            return
        idle = 0.0 if rows or lines else idle + poll_s
        if idle >= HEARTBEAT_S:
            idle = 0.0
            yield ": keep-alive\n\n"  # proxies close connections that stay silent
        await asyncio.sleep(poll_s)
