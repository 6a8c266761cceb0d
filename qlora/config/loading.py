"""A job YAML -> a validated JobConfig: `key=value` overrides (--set and QLORA_SET), one-line
errors, relative paths resolved against the job file's folder (so a job and its data can move
together), and the resolved config written back as YAML."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Optional

import yaml
from pydantic import BaseModel, ValidationError

from qlora.config.messages import first_problem
from qlora.config.schema import DATA_FILE_SUFFIXES, JobConfig
from qlora.errors import ConfigError

# The environment variable holding --set overrides, for schedulers that cannot pass arguments.
OVERRIDES_ENV = "QLORA_SET"


def load_config(
    path: str | os.PathLike,
    overrides: list[str] | tuple[str, ...] = (),
    env_overrides: list[str] | tuple[str, ...] = (),
) -> JobConfig:
    """Read a job YAML, apply `key=value` overrides, validate, and resolve relative paths.

    `env_overrides` (from QLORA_SET, see overrides_from_env) are applied first, so a --set of
    the same key wins; a problem with a key that only QLORA_SET set is reported as QLORA_SET's."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(error, 'problem', error)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a job config must be a mapping of sections (model, data, ...)")
    origins = {}
    for override in env_overrides:
        origins[apply_override(raw, override, origin=OVERRIDES_ENV)] = OVERRIDES_ENV
    for override in overrides:
        origins.pop(apply_override(raw, override), None)
    return resolve_paths(validate(raw, source=str(path), origins=origins), base_dir=path.resolve().parent)


def overrides_from_env(environ: dict[str, str] = os.environ) -> list[str]:
    """QLORA_SET="train.max_steps=100 output.dir='/out/run 2'" -> ["train.max_steps=100", ...]:
    --set for schedulers that can set a container's environment but not its arguments. Split
    like a shell command line, so a value with spaces can be quoted."""
    text = environ.get(OVERRIDES_ENV, "")
    try:
        return shlex.split(text)
    except ValueError as error:
        raise ConfigError(f"{OVERRIDES_ENV}={text!r}: {error}") from None


def apply_override(raw: dict, override: str, origin: str = "--set") -> str:
    """Set `section.key=value` in the raw mapping; the value is parsed as YAML (20, true, [a, b]).
    Returns the dotted key; `origin` names where the override came from in errors."""
    key, sep, value = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"{origin} {override!r}: expected section.key=value")
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{origin} {override!r}: {part} is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        node[parts[-1]] = value
    return ".".join(parts)


def validate(
    raw: dict, source: str = "config", origins: Optional[dict[str, str]] = None, schema: type[BaseModel] = JobConfig
):
    """Validate a raw mapping into a JobConfig (or another `schema`: a section); the first problem
    becomes a one-line ConfigError (qlora.config.messages). `origins` maps a dotted key to where
    its value came from, when not from `source`."""
    try:
        return schema.model_validate(raw)
    except ValidationError as error:
        key, message = first_problem(error, schema)
        raise ConfigError(f"{(origins or {}).get(key, source)}: {message}") from None


def resolve_paths(config: JobConfig, base_dir: Path) -> JobConfig:
    """Make local paths absolute relative to the job file's folder; hub ids stay as they are."""

    def local(value: str) -> str:
        expanded = Path(value).expanduser()
        return str(expanded if expanded.is_absolute() else (base_dir / expanded).resolve())

    def local_if_exists(value: str) -> str:
        # A hub id ("org/name") and a relative folder look alike: a folder that exists wins.
        candidate = Path(local(value))
        explicit = value.startswith((".", "/", "~"))
        return str(candidate) if explicit or candidate.exists() else value

    def data_path(value: str) -> str:
        # A data file is named by its extension; anything else may be a cached dataset name.
        return local(value) if value.lower().endswith(DATA_FILE_SUFFIXES) else local_if_exists(value)

    config.model.name_or_path = local_if_exists(config.model.name_or_path)
    if config.model.tokenizer is not None:
        config.model.tokenizer = local_if_exists(config.model.tokenizer)
    for key in ("adapter", "reference_adapter"):  # adapter folders are local: we read them before loading
        if getattr(config.model, key) is not None:
            setattr(config.model, key, local(getattr(config.model, key)))
    if isinstance(config.data.train, str):
        config.data.train = data_path(config.data.train)
    else:
        for source in config.data.train:
            source.path = data_path(source.path)
    if config.data.eval is not None:
        config.data.eval = data_path(config.data.eval)
    config.output.dir = local(config.output.dir)
    return config


def dump_config(config: JobConfig) -> str:
    """The resolved config as YAML, written next to the adapter."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
