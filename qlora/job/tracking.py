"""The job's experiment trackers (train.report_to), built from the config at the edge: the loop
only sees metrics rows (qlora.training.trackers)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

from qlora.config import JobConfig
from qlora.job.resume import flatten
from qlora.training.trackers import Trackers, open_trackers


def job_trackers(
    config: JobConfig, resume_step: Optional[int], logged_through: int, echo: Callable[[str], None]
) -> Trackers:
    """Rank 0's trackers, given the resolved config as `section.key` hyper-parameters; a resumed
    run (`resume_step`: its checkpoint's step) continues the tracker runs it started."""
    params = flatten(config.model_dump(mode="json"))
    return open_trackers(config.train.report_to, Path(config.output.dir), params, resume_step, logged_through, echo)


def last_logged_step(metrics_path: Path) -> int:
    """The highest step in metrics.jsonl (0 if none): a killed run fed its trackers up to there."""
    last = 0
    if metrics_path.is_file():
        for line in metrics_path.read_text().splitlines():
            try:
                last = max(last, int(json.loads(line).get("step", 0)))
            except (ValueError, TypeError, AttributeError):
                continue
    return last
