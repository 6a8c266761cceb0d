"""Experiment trackers: TensorBoard, MLflow and W&B get what metrics.jsonl gets.

Each tracker logs every metrics row's numbers keyed by step, the resolved config as
hyper-parameters (flattened `section.key`) and the adapter path at the end. The libraries are
imported only when a job names them. A tracker is a view of the run, never a reason to stop it:
one that fails (server gone, store deleted) is dropped with one warning line, and metrics.jsonl
stays complete. A resumed run continues the same tracker run; the ids are kept in
OUTPUT/trackers.json.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Optional

from qlora.errors import ConfigError
from qlora.output_dir import write_atomically

STATE_FILE = "trackers.json"
# The package each tracker needs (its extra's name too), and the module the tracker imports.
MODULES = {"tensorboard": "torch.utils.tensorboard", "mlflow": "mlflow.tracking", "wandb": "wandb"}


def check_installed(names: list[str]) -> None:
    """A named tracker that cannot be imported is a config error, found before anything loads."""
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise ConfigError(
                f"train.report_to: {name} is not installed; pip install 'qlora[{name}]' (or remove it from the list)"
            )
        try:
            importlib.import_module(MODULES[name])
        except Exception as error:  # noqa: BLE001 - a broken install raises anything
            raise ConfigError(
                f"train.report_to: {name} is installed but cannot be imported ({reason_of(error)})"
            ) from None


def reason_of(error: BaseException) -> str:
    """A library's error as one short line (its message's whitespace collapsed, at most 200 chars)."""
    return " ".join(str(error).split())[:200] or type(error).__name__


def numbers(row: dict) -> dict:
    """The row's finite numbers but the step itself: what a tracker can plot."""
    return {
        key: float(value)
        for key, value in row.items()
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    }


class TensorBoardTracker:
    """Event files in `folder`; a resume purges the events a killed run wrote after its checkpoint."""

    name = "tensorboard"

    def __init__(self, folder: Path, params: dict, resume_step: Optional[int]):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.writer = SummaryWriter(str(folder), purge_step=resume_step + 1 if resume_step is not None else None)
        self.last_step = resume_step or 0
        if resume_step is None:
            # Into this writer, not add_hparams' own timestamped sub-folder: one run, one folder.
            plain = {
                key: value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
                for key, value in params.items()
            }
            for summary in hparams(plain, {}):
                self.writer.file_writer.add_summary(summary)
        self.writer.flush()

    def log(self, step: int, values: dict) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()
        self.last_step = step

    def finish(self, adapter: str, values: dict) -> None:
        self.log(self.last_step, values)
        self.writer.add_text("adapter", adapter, global_step=self.last_step)
        self.close(finished=True)

    def close(self, finished: bool = False) -> None:
        self.writer.close()


class MlflowTracker:
    """One MLflow run in `tracking_uri` (the experiment MLFLOW_EXPERIMENT_NAME, default qlora)."""

    name = "mlflow"

    def __init__(self, tracking_uri: str, run_name: str, params: dict, saved: dict):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.run_id = saved.get("run_id") if saved.get("tracking_uri") == tracking_uri else None
        self.logged_through = -1  # nothing yet: step 0 (the eval before training) is a step too
        if self.run_id:
            self.client.update_run(self.run_id, status="RUNNING")
            # The store says which steps the killed run got to: those stay, once.
            data = self.client.get_run(self.run_id).data
            for key in data.metrics:
                history = self.client.get_metric_history(self.run_id, key)
                self.logged_through = max([self.logged_through] + [metric.step for metric in history])
        else:
            experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "qlora")
            experiment = self.client.get_experiment_by_name(experiment_name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(experiment_name)
            self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
            # MLflow takes at most 100 params a request.
            items = [Param(key, str(value)[:6000]) for key, value in params.items()]
            for start in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[start : start + 100])
        self.state = {"run_id": self.run_id, "tracking_uri": tracking_uri}
        self.last_step = 0

    def log(self, step: int, values: dict) -> None:
        from mlflow.entities import Metric

        self.last_step = max(self.last_step, step)
        if step <= self.logged_through:
            return
        stamp = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, stamp, step) for key, value in values.items()])

    def finish(self, adapter: str, values: dict) -> None:
        if self.last_step > self.logged_through:
            self.log(self.last_step, values)
        self.client.set_tag(self.run_id, "adapter", adapter)
        self.close(finished=True)

    def close(self, finished: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if finished else "KILLED")


class WandbTracker:
    """One W&B run; wandb reads WANDB_PROJECT, WANDB_MODE, WANDB_DIR, WANDB_ENTITY ... itself."""

    name = "wandb"

    def __init__(self, run_name: str, params: dict, saved: dict, logged_through: int):
        import wandb

        run_id = saved.get("run_id")
        self.run = wandb.init(
            id=run_id,
            resume="allow" if run_id else None,
            project=None if os.environ.get("WANDB_PROJECT") else "qlora",
            name=None if os.environ.get("WANDB_NAME") else run_name,
            # Read now: wandb's process-wide settings keep the first run's WANDB_DIR, so a second
            # job in one process (the service) would write where the first one did.
            dir=os.environ.get("WANDB_DIR"),
            reinit="create_new",
        )
        self.run.config.update(params, allow_val_change=True)
        self.state = {"run_id": self.run.id}
        # W&B keeps what it was sent: the steps the killed run logged stay, once.
        self.logged_through = logged_through if run_id else -1  # a new run logs from step 0 on
        self.last_step = 0

    def log(self, step: int, values: dict) -> None:
        self.last_step = max(self.last_step, step)
        if step > self.logged_through:
            self.run.log(values, step=step)

    def finish(self, adapter: str, values: dict) -> None:
        self.run.summary.update({"adapter": adapter, **values})
        self.close(finished=True)

    def close(self, finished: bool = False) -> None:
        self.run.finish(exit_code=0 if finished else 1)


class Trackers:
    """The job's trackers as one: each call reaches every live tracker, and a tracker that raises
    is dropped with one warning line (`warn`), so it never fails the training."""

    def __init__(self, trackers: list, warn: Callable[[str], None]):
        self.trackers = trackers
        self.warn = warn

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def log(self, row: dict) -> None:
        values = numbers(row)
        self._each(lambda tracker: tracker.log(row["step"], values), "log")

    def finish(self, adapter: str, values: dict) -> None:
        self._each(lambda tracker: tracker.finish(adapter, numbers(values)), "finish")
        self.trackers = []

    def close(self) -> None:
        """On every other way out (a stop, an error): the tracker runs end unfinished, to be resumed."""
        self._each(lambda tracker: tracker.close(), "close", quiet=True)
        self.trackers = []

    def _each(self, call, what: str, quiet: bool = False) -> None:
        for tracker in list(self.trackers):
            try:
                call(tracker)
            except Exception as error:  # noqa: BLE001 - whatever a tracker's library raises
                self.trackers.remove(tracker)
                if not quiet:
                    self.warn(f"warning: {tracker.name} failed to {what} ({reason_of(error)}); no more logging to it")


def open_trackers(
    names: list[str],
    output_dir: Path,
    params: dict,
    resume_step: Optional[int],
    logged_through: int,
    warn: Callable[[str], None],
) -> Trackers:
    """The trackers `names` for the run in output_dir, continuing the stored tracker runs when
    `resume_step` (the checkpoint's step) is given; `logged_through` is the last step the killed
    run logged. A tracker that cannot start is a warning, not a failed job."""
    saved = read_state(output_dir) if resume_step is not None else {}
    started = []
    for name in names:
        try:
            started.append(start(name, output_dir, params, resume_step, saved.get(name, {}), logged_through))
        except Exception as error:  # noqa: BLE001
            warn(f"warning: {name} failed to start ({reason_of(error)}); training goes on without it")
    # A tracker that could not start this time keeps its stored id for the next resume.
    state = {**saved, **{tracker.name: tracker.state for tracker in started if hasattr(tracker, "state")}}
    if state:
        write_atomically(output_dir / STATE_FILE, json.dumps(state, indent=2))
    return Trackers(started, warn)


def start(name: str, output_dir: Path, params: dict, resume_step: Optional[int], saved: dict, logged_through: int):
    if name == "tensorboard":
        return TensorBoardTracker(output_dir / "tensorboard", params, resume_step)
    if name == "mlflow":
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # MLflow 3 keeps its file store behind an opt-in; it is the local default we promise.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (output_dir / "mlruns").resolve().as_uri()
        return MlflowTracker(uri, output_dir.resolve().name, params, saved)
    return WandbTracker(output_dir.resolve().name, params, saved, logged_through)


def read_state(output_dir: Path) -> dict:
    path = output_dir / STATE_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}
