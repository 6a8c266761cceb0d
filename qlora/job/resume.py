"""Resuming a job: which checkpoint, whether it belongs to this run, the metrics log rewound to it.

A run is defined by its config (minus the keys that only say where and how often to write or
evaluate) and by its tokenized data. Both are recorded in every checkpoint; a rerun whose
record differs is a different run and is refused unless the user says --resume-anyway.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from pathlib import Path
from typing import Callable, Optional

from qlora.adapters.manifest import ADAPTER_WEIGHTS
from qlora.config import JobConfig
from qlora.errors import CheckpointError
from qlora.output_dir import write_atomically
from qlora.provenance import library_versions, sha256_file
from qlora.training.checkpoint import COMPLETE_MARKER, checkpoint_step, complete_checkpoints

# Keys that do not change what is trained: moving the output, saving, logging and evaluating
# more or less often (eval passes leave training bitwise unchanged: tests/test_training.py).
RUN_NEUTRAL_KEYS = frozenset(
    {
        "output.dir",
        "train.save_every",
        "train.keep_checkpoints",
        "train.log_every",
        "train.eval_every",
        "train.eval_exact_match",
        "train.eval_max_new_tokens",
        "train.memory_budget",  # only steers micro_batch_size and gradient_checkpointing auto, whose picks are recorded
        "train.report_to",  # where the numbers are also sent
    }
)


def run_record(config: JobConfig, train_examples: list, eval_examples: list, world_size: int = 1) -> dict:
    """What makes this run this run: its defining config keys, data fingerprint, the number of
    processes (each optimizer step's rows and every rank's RNG depend on it), and versions."""
    flat = flatten(config.model_dump(mode="json"))
    defining = {key: value for key, value in flat.items() if key not in RUN_NEUTRAL_KEYS}
    return {
        "config": defining,
        "config_sha256": hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest(),
        "data_sha256": data_fingerprint(train_examples, eval_examples),
        "adapters_sha256": adapter_fingerprints(config),
        "world_size": world_size,
        "versions": library_versions(),
    }


def adapter_fingerprints(config: JobConfig) -> dict:
    """The config names the start and reference adapters' folders; these are what they hold."""
    folders = {"model.adapter": config.model.adapter, "model.reference_adapter": config.model.reference_adapter}
    return {key: sha256_file(Path(folder) / ADAPTER_WEIGHTS) for key, folder in folders.items() if folder is not None}


def find_checkpoint(output_dir: Path, resume_from: Optional[str]) -> Optional[Path]:
    """The checkpoint to resume from: --resume-from if given (it must be complete), else the
    newest complete one in output_dir/checkpoints, else None."""
    root = output_dir / "checkpoints"
    if resume_from is None:
        found = complete_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume_from).expanduser().resolve()
    if not path.is_dir():
        raise CheckpointError(f"--resume-from: {path} not found")
    step = checkpoint_step(path)
    if step is None:
        raise CheckpointError(f"--resume-from: {path} is not a checkpoint folder (checkpoints/step-N)")
    if not (path / COMPLETE_MARKER).is_file():
        raise CheckpointError(
            f"--resume-from: {path} is incomplete (no {COMPLETE_MARKER} marker: its writer was interrupted)"
        )
    later = [other for other in complete_checkpoints(root) if checkpoint_step(other) > step]
    if later:
        raise CheckpointError(
            f"--resume-from: {root} holds later checkpoints ({', '.join(other.name for other in later)}); "
            "move them away first, or the next resume would mix two runs"
        )
    return path


def check_same_run(
    checkpoint: Path, saved_run: dict, record: dict, resume_anyway: bool, echo: Callable[[str], None]
) -> None:
    """Refuse a checkpoint of a different run (its saved record differs from this job's)."""
    saved_size, size = saved_run.get("world_size", 1), record["world_size"]
    saved_sharded = saved_size > 1 and saved_run.get("config", {}).get("train.distributed") == "fsdp"
    sharded = size > 1 and record["config"].get("train.distributed") == "fsdp"
    if (saved_sharded or sharded) and (saved_size, saved_sharded) != (size, sharded):
        # FSDP's optimizer state is each rank's shard: it fits no other layout.
        raise CheckpointError(
            f"{checkpoint}: trained on {saved_size} process(es){' with fsdp' if saved_sharded else ''}, this run "
            f"has {size}{' with fsdp' if sharded else ''}; the optimizer state does not carry over "
            "(--resume-anyway cannot reshard it): relaunch as it was trained"
        )
    if saved_size != size and not resume_anyway:
        raise CheckpointError(
            f"{checkpoint}: trained on {saved_size} process(es), this run has {size}; the same steps need the "
            "same world size: relaunch with it, or pass --resume-anyway to continue with a different batch per step"
        )
    if saved_size != size:
        echo(f"warning: resuming a {saved_size}-process checkpoint on {size} processes")
    changes = describe_changes(saved_run.get("config", {}), record["config"])
    if saved_run.get("data_sha256") != record["data_sha256"]:
        changes.append("the training or eval data (tokenized rows differ)")
    if saved_run.get("adapters_sha256", {}) != record["adapters_sha256"]:
        changes.append("the weights in model.adapter or model.reference_adapter")
    if changes and not resume_anyway:
        raise CheckpointError(
            f"{checkpoint}: the job changed since this checkpoint ({'; '.join(changes)}); "
            "pass --resume-anyway to continue with the new settings, or --overwrite to start over"
        )
    if changes:
        echo(f"warning: resuming with changes: {'; '.join(changes)}")
    versions = saved_run.get("versions", {})
    moved = [
        f"{name} {versions.get(name)} -> {now}" for name, now in record["versions"].items() if versions.get(name) != now
    ]
    if moved:
        echo(
            f"warning: library versions changed since the checkpoint ({', '.join(moved)}); "
            "results may differ in the last digits"
        )


def describe_changes(before: dict, after: dict, most: int = 4) -> list[str]:
    keys = sorted(key for key in before.keys() | after.keys() if before.get(key) != after.get(key))
    described = [f"{key}: {before.get(key)!r} -> {after.get(key)!r}" for key in keys[:most]]
    if len(keys) > most:
        described.append(f"{len(keys) - most} more keys")
    return described


def rewind_metrics(path: Path, step: int) -> int:
    """Drop the rows a killed run logged after its checkpoint (and a torn last line); returns the
    last step it had logged (0 if none): it fed its experiment trackers up to there."""
    if not path.is_file():
        return 0
    kept, logged_through = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        logged_through = max(logged_through, row.get("step", 0))
        if row.get("step", 0) <= step:
            kept.append(line)
    write_atomically(path, "".join(line + "\n" for line in kept))
    return logged_through


def data_fingerprint(*example_sets: list) -> str:
    """sha256 over every example's token ids and labels: catches edited files and tokenizer changes."""
    digest = hashlib.sha256()
    for examples in example_sets:
        for example in examples:
            digest.update(array("q", example.input_ids).tobytes())
            digest.update(array("q", example.labels).tobytes())
            digest.update(b"|")
        digest.update(b"#")
    return digest.hexdigest()


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
