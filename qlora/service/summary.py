"""A job's numbers in one record, for the page: what it trains (from its job.yaml), how far it got
and how fast (its metrics.jsonl while it runs), and what it left (summary.json once finished).

The job's own files are the source: nothing here is stored twice. A number a running job does not
know yet (peak memory, adapter size) is None until summary.json exists.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import yaml

from qlora.config import validate
from qlora.errors import ConfigError
from qlora.output_dir import FINISHED_MARKER
from qlora.service.store import Job
from qlora.service.submission import relative_to_root

# What a dpo / orpo job's page shows beside its losses (the last two only ORPO writes).
PREFERENCE_METRICS = ("rewards/accuracy", "rewards/margin", "logps/accuracy", "log_odds_ratio", "nll_loss")


def read_metrics(path: Path) -> list[dict]:
    """Every row of a metrics.jsonl, one per step (a resumed run rewrites the steps after its
    checkpoint: the newest row of a step wins), in step order; a line being written is skipped."""
    if not path.exists():
        return []
    by_step: dict[int, dict] = {}
    for line in path.read_bytes().split(b"\n")[:-1]:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            by_step[row["step"]] = {**by_step.get(row["step"], {}), **row}
    return [by_step[step] for step in sorted(by_step)]


def job_summary(job: Job, folder: Path, root: Path) -> dict:
    config = submitted_sections(folder / "job.yaml")
    model, quantization, lora, train = (config.get(key, {}) for key in ("model", "quantization", "lora", "train"))
    rows = read_metrics(folder / "output" / "metrics.jsonl")
    trained = [row for row in rows if row.get("loss") is not None]
    evaluated = [row for row in rows if row.get("eval_loss") is not None]
    latest = trained[-1] if trained else {}
    finished = read_json(folder / "output" / FINISHED_MARKER)
    objective = train.get("objective") or "sft"
    started = job.started
    ended = job.finished if job.finished else (time.time() if job.state == "running" else None)
    return {
        "id": job.id,
        "name": job.name,
        "state": job.state,
        "base": relative_to_root(str(model.get("name_or_path", "")), root) or None,
        "quantization": {key: quantization.get(key) for key in ("bits", "quant_type", "double_quant", "compute_dtype")},
        "lora": {key: lora.get(key) for key in ("r", "alpha", "dropout")},
        "learning_rate": train.get("learning_rate"),
        "step": rows[-1]["step"] if rows else 0,
        "total_steps": job.total_steps,
        "duration_s": ended - started if started and ended else None,
        "train_seconds": finished.get("seconds", latest.get("elapsed_s")),
        "supervised_tokens_per_s": finished.get("tokens_per_s", latest.get("tokens_per_s")),
        "mfu": finished.get("mfu", latest.get("mfu")),
        "peak_memory_bytes": finished.get("peak_memory_bytes"),
        "peak_memory_kind": finished.get("peak_memory_kind"),
        "adapter_bytes": finished.get("adapter_bytes"),
        "final_loss": finished.get("final_loss", latest.get("loss")),
        "initial_eval_loss": finished.get("eval_loss_before", initial_eval(evaluated)),
        "final_eval_loss": finished.get("eval_loss", evaluated[-1]["eval_loss"] if evaluated else None),
        "objective": objective,
        "preference": preference_summary(rows, finished) if objective != "sft" else None,
        "finished": bool(finished),
    }


def preference_summary(rows: list[dict], finished: dict) -> dict:
    """Per preference metric the job wrote: its last train value, its eval before training (the
    step-0 row: the adapter starts as the base) and its last eval; summary.json's once finished."""

    def last(key: str) -> Optional[float]:
        return next((row[key] for row in reversed(rows) if row.get(key) is not None), None)

    before = rows[0] if rows and rows[0]["step"] == 0 else {}
    found = {}
    for name in PREFERENCE_METRICS:
        numbers = {
            "train": finished.get(name, last(name)),
            "eval_before": before.get(f"eval_{name}"),
            "eval": finished.get(f"eval_{name}", last(f"eval_{name}")),
        }
        if any(value is not None for value in numbers.values()):
            found[name] = numbers
    return found


def submitted_sections(job_file: Path) -> dict:
    """The job's config with the schema's defaults filled in (as plain dicts); the raw YAML if it no
    longer validates (a data file removed since), so a summary never fails on an old job."""
    raw = yaml.safe_load(job_file.read_text()) if job_file.exists() else {}
    raw = raw if isinstance(raw, dict) else {}
    try:
        return validate(raw, source=str(job_file)).model_dump()
    except ConfigError:
        return {key: value for key, value in raw.items() if isinstance(value, dict)}


def initial_eval(evaluated: list[dict]) -> Optional[float]:
    """The eval loss before training: the step-0 row (the loop evaluates the base first)."""
    return evaluated[0]["eval_loss"] if evaluated and evaluated[0]["step"] == 0 else None


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
