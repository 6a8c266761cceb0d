"""The job's experiment trackers (train.report_to), built from the config at the edge: the loop
only sees metrics rows (qlora.training.trackers)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

from qlora.config import JobConfig
from qlora.job.resume import flatten
from qlora.training.trackers import open_trackers


@contextmanager
def job_trackers(
    config: JobConfig, resume_step: Optional[int], logged_through: int, echo: Callable[[str], None], main: bool
):
    """Rank 0's trackers (`main`; the other ranks' are none), given the resolved config as
    `section.key` hyper-parameters; a resumed run (`resume_step`: its checkpoint's step) continues
    the tracker runs it started. On a way out other than Trackers.finish (a stop, an error) the
    tracker runs end unfinished, for the resume to continue."""
    params = flatten(config.model_dump(mode="json"))
    names = config.train.report_to if main else []
    trackers = open_trackers(names, Path(config.output.dir), params, resume_step, logged_through, echo)
    try:
        yield trackers
    finally:
        trackers.close()
