"""A submitted config -> a job folder ROOT/jobs/<id>/job.yaml, checked exactly as the CLI checks it.

Every path in the config is taken relative to the service root and must stay inside it; the
output folder is the service's (ROOT/jobs/<id>/output), whatever the config said. The schema
check runs in-process (instant); the data check (`qlora validate`: every row read and
tokenized, no weights loaded) runs in a subprocess, so a data file that crashes a parser
crashes that subprocess, not the service.
"""

from __future__ import annotations

import copy
import json
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from qlora.config import load_config
from qlora.errors import ConfigError
from qlora.service.process import child_environment, qlora_command
from qlora.service.security import PathRejected, inside_root

JOBS_FOLDER = "jobs"
VALIDATION_TIMEOUT_S = 900


class Rejected(ValueError):
    """The submission cannot become a job: the one-line reason goes back as a 400."""


@dataclass
class Submission:
    job_id: str
    folder: Path
    total_steps: Optional[int]
    notes: tuple[str, ...] = ()
    """What the service changed in the config, said in the 201 answer and kept in the job record."""


def new_job_id() -> str:
    """Sortable by submission time, unguessable enough not to collide: 20261123-235959-a1b2c3."""
    return f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


def job_folder(root: Path, job_id: str) -> Path:
    return root / JOBS_FOLDER / job_id


def prepare_job(root: Path, raw, allow_remote_code: bool, device: Optional[str]) -> Submission:
    """Write and check a job folder; on any problem remove it and raise Rejected."""
    if not isinstance(raw, dict):
        raise Rejected("config: a job config must be a mapping of sections (model, data, ...)")
    job_id = new_job_id()
    folder = job_folder(root, job_id)
    folder.mkdir(parents=True)
    try:
        job_file = folder / "job.yaml"
        job_file.write_text(yaml.safe_dump(confined(root, raw, folder / "output"), sort_keys=False))
        try:
            config = load_config(job_file)
        except ConfigError as error:
            raise Rejected(relative_to_root(str(error), root)) from None
        if config.model.trust_remote_code and not allow_remote_code:
            raise Rejected(
                "model.trust_remote_code: refused; this service runs no code shipped with a model "
                "(start it with --allow-remote-code to allow)"
            )
        report = validate_data(job_file, folder, device)
        return Submission(job_id, folder, report.get("optimizer_steps"), output_notes(raw, job_id))
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def confined(root: Path, raw: dict, output_dir: Path) -> dict:
    """A copy of the raw config with every local path made absolute inside the root.

    Only strings are rewritten: a value of the wrong type is left for the schema check, which
    names the key as the CLI would."""
    raw = copy.deepcopy(raw)
    model = raw.get("model") if isinstance(raw.get("model"), dict) else {}
    for key in ("name_or_path", "tokenizer"):
        if isinstance(model.get(key), str):
            model[key] = model_path(root, model[key], f"model.{key}")
    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    if isinstance(data.get("train"), str):
        data["train"] = data_path(root, data["train"], "data.train")
    elif isinstance(data.get("train"), list):
        for index, source in enumerate(data["train"]):
            if isinstance(source, dict) and isinstance(source.get("path"), str):
                source["path"] = data_path(root, source["path"], f"data.train[{index}].path")
    if isinstance(data.get("eval"), str):
        data["eval"] = data_path(root, data["eval"], "data.eval")
    output = raw.get("output") if isinstance(raw.get("output"), dict) else {}
    raw["output"] = {**output, "dir": str(output_dir)}
    return raw


def output_notes(raw: dict, job_id: str) -> tuple[str, ...]:
    """A submitted output.dir is not used: say so, rather than ignore it silently."""
    output = raw.get("output") if isinstance(raw.get("output"), dict) else {}
    if output.get("dir") is None:
        return ()
    return (
        f"output.dir: {output['dir']!r} is not used: the output goes to {JOBS_FOLDER}/{job_id}/output "
        f"(download the adapter with GET /v1/jobs/{job_id}/adapter)",
    )


def submitted_config(root: Path, job_id: str) -> str:
    """The job's config as YAML a client can submit again: paths relative to the root, no output.dir."""
    raw = yaml.safe_load((job_folder(root, job_id) / "job.yaml").read_text())
    output = raw.get("output") if isinstance(raw.get("output"), dict) else {}
    output.pop("dir", None)
    if not output:
        raw.pop("output", None)
    return relative_to_root(yaml.safe_dump(raw, sort_keys=False, width=2**16), root)


def data_path(root: Path, value: str, key: str) -> str:
    try:
        return str(inside_root(root, value, key))
    except PathRejected as error:
        raise Rejected(str(error)) from None


def model_path(root: Path, value: str, key: str) -> str:
    """A folder inside the root, or a hub id ("org/name") when no such folder exists."""
    resolved = data_path(root, value, key)
    if Path(resolved).exists() or value.startswith("."):
        return resolved
    return value


def validate_data(job_file: Path, folder: Path, device: Optional[str]) -> dict:
    """`qlora validate --json job.yaml` in a subprocess: its report, or its one error line."""
    try:
        process = subprocess.run(
            qlora_command("validate", "--json", str(job_file)),
            cwd=folder,
            env=child_environment(device),
            capture_output=True,
            text=True,
            timeout=VALIDATION_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        raise Rejected(
            f"data: checking the data took over {VALIDATION_TIMEOUT_S} s; split it or check it with `qlora validate`"
        ) from None
    root = folder.parents[1]
    if process.returncode != 0:
        raise Rejected(
            relative_to_root(last_error_line(process.stderr) or f"qlora validate exited {process.returncode}", root)
        )
    lines = process.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else {}


def last_error_line(text: str) -> Optional[str]:
    """The CLI's own one-line message (`error: ...`), without its prefix."""
    for line in reversed(text.replace("\r", "\n").splitlines()):
        if line.startswith("error: "):
            return line.removeprefix("error: ")
    return None


def relative_to_root(message: str, root: Path) -> str:
    """Paths in messages shown relative to the root: a client has no business with the server's layout."""
    real_root = str(root.resolve())
    return message.replace(real_root + "/", "").replace(str(root) + "/", "")
