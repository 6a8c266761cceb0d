"""Training state on disk: atomic checkpoints, discovery, and a pickle-free state format.

A checkpoint is `checkpoints/step-NNNNNNNN/`: the adapter (written by the caller), and
`training_state.json` + `training_state.safetensors` holding everything else the run needs to
continue exactly: optimizer and LR-schedule state, RNG states, the data position, counters, and
the caller's run record (config, data fingerprint, versions).

Atomic: it is filled in a `.tmp-*` folder, fsynced, marked COMPLETE, then renamed into place. A
kill at any moment leaves at most a `.tmp-*` folder, which is never taken for a checkpoint. Old
checkpoints are deleted only after the new one is complete.

No pickle anywhere: tensors go to safetensors, everything else to JSON, so loading a checkpoint
never executes code from it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from qlora.errors import CheckpointError
from qlora.output_dir import apply_umask
from qlora.provenance import sha256_file

COMPLETE_MARKER = "COMPLETE"
PREFIX = "step-"
STATE_JSON = "training_state.json"
STATE_TENSORS = "training_state.safetensors"
STATE_FORMAT = 1


@dataclass
class TrainingState:
    """Where a run stands after an optimizer step: enough to continue it bit for bit."""

    step: int = 0
    epoch: int = 0
    """Epoch of the next micro-batch."""
    batch_index: int = 0
    """Index of the next micro-batch within that epoch's (seeded) order."""
    supervised_tokens: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0
    loss: Optional[float] = None
    """Train loss of the last step."""
    eval_loss: Optional[float] = None
    eval_loss_before: Optional[float] = None
    optimizer: dict = field(default_factory=dict)
    scheduler: dict = field(default_factory=dict)
    grad_scaler: Optional[dict] = None
    rng: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- atomic folders


def save_checkpoint(root: Path, step: int, write: Callable[[Path], None], keep: int) -> Path:
    """Let `write(folder)` fill a fresh temp folder, then publish it as step-N and prune to `keep`."""
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{PREFIX}{step:08d}-", dir=root))
    try:
        write(staging)
        apply_umask(staging)
        fsync_tree(staging)
        # The marker goes last, after the data is durable: a folder with it is whole, and the
        # hashes it lists let a resume tell a damaged file from a good one.
        files = {
            str(path.relative_to(staging)): sha256_file(path) for path in sorted(staging.rglob("*")) if path.is_file()
        }
        with open(staging / COMPLETE_MARKER, "w") as marker:
            marker.write(json.dumps({"step": step, "files": files}, indent=1))
            marker.flush()
            os.fsync(marker.fileno())
        final = root / f"{PREFIX}{step:08d}"
        if final.exists():
            shutil.rmtree(final)
        os.rename(staging, final)
        fsync_directory(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for old in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(old)
    return final


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first, sorted by step number (not by name or mtime)."""
    if not root.is_dir():
        return []
    found = [
        path for path in root.iterdir() if checkpoint_step(path) is not None and (path / COMPLETE_MARKER).is_file()
    ]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path: Path) -> Optional[int]:
    name = path.name
    if path.is_dir() and name.startswith(PREFIX) and name[len(PREFIX) :].isdigit():
        return int(name[len(PREFIX) :])
    return None


def verify_checkpoint(folder: Path) -> None:
    """Every file the COMPLETE marker lists is there with the same sha256, or CheckpointError."""
    try:
        files = json.loads((folder / COMPLETE_MARKER).read_text())["files"]
    except (OSError, ValueError, KeyError) as error:
        raise CheckpointError(f"{folder}: unreadable {COMPLETE_MARKER} marker ({error.__class__.__name__})") from None
    for name, digest in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing from the checkpoint; resume from an older one with --resume-from")
        if sha256_file(path) != digest:
            raise CheckpointError(
                f"{path}: damaged (sha256 differs from when it was written); "
                "resume from an older one with --resume-from"
            )


def remove_partial_checkpoints(root: Path) -> list[Path]:
    """Delete the `.tmp-*` folders a killed writer left behind; returns what was removed."""
    partial = sorted(root.glob(f".tmp-{PREFIX}*")) if root.is_dir() else []
    for path in partial:
        shutil.rmtree(path, ignore_errors=True)
    return partial


def fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    fsync_directory(folder)


def fsync_directory(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# --------------------------------------------------------------------------- training state


def save_training_state(folder: Path, state: TrainingState, run: dict) -> None:
    """training_state.json (readable: step, position, counters, run record) + tensors."""
    from safetensors.torch import save_file

    tensors: dict = {}
    record = asdict_shallow(state)
    for name in ("optimizer", "scheduler", "grad_scaler", "rng"):
        record[name] = encode(record[name], name, tensors)
    save_file(tensors, str(folder / STATE_TENSORS))
    (folder / STATE_JSON).write_text(json.dumps({"format": STATE_FORMAT, **record, "run": run}, indent=1))


def read_run_record(folder: Path) -> dict:
    """The JSON half of a checkpoint (no tensors loaded): step, position, counters and `run`."""
    path = folder / STATE_JSON
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path}: unreadable checkpoint state ({error.__class__.__name__}: {error})") from None
    if record.get("format") != STATE_FORMAT or "step" not in record or "run" not in record:
        raise CheckpointError(f"{path}: not a qlora checkpoint state (format {record.get('format')!r})")
    return record


def load_training_state(folder: Path) -> tuple[TrainingState, dict]:
    """(state, run record) of a checkpoint; a missing or damaged file is a CheckpointError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    record = read_run_record(folder)
    try:
        tensors = load_file(str(folder / STATE_TENSORS))
    except (OSError, SafetensorError) as error:
        raise CheckpointError(f"{folder / STATE_TENSORS}: unreadable ({error})") from None
    try:
        values = {name: decode(record[name], tensors) for name in ("optimizer", "scheduler", "grad_scaler", "rng")}
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{folder / STATE_JSON}: damaged state ({error.__class__.__name__}: {error})") from None
    scalars = {
        name: record[name]
        for name in (
            "step",
            "epoch",
            "batch_index",
            "supervised_tokens",
            "tokens",
            "elapsed_s",
            "loss",
            "eval_loss",
            "eval_loss_before",
        )
    }
    return TrainingState(**scalars, **values), record["run"]


def asdict_shallow(state: TrainingState) -> dict:
    # dataclasses.asdict deep-copies every tensor of the optimizer state; a shallow view is enough.
    return {name: getattr(state, name) for name in asdict(TrainingState())}


# A JSON tree with tagged containers, so ints stay ints, tuples stay tuples and dict keys keep
# their type (optimizer state is keyed by int); tensors are references into the safetensors file.


def encode(value: Any, path: str, tensors: dict) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        # A copy per entry: safetensors refuses tensors that share memory (bitsandbytes shares
        # its quantization maps between parameters).
        tensors[path] = value.detach().to("cpu", copy=True).contiguous()
        return {"tensor": path}
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        return {"ndarray": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, dict):
        return {"dict": [[key, encode(item, f"{path}.{key}", tensors)] for key, item in value.items()]}
    if isinstance(value, (list, tuple)):
        tag = "tuple" if isinstance(value, tuple) else "list"
        return {tag: [encode(item, f"{path}.{index}", tensors) for index, item in enumerate(value)]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{path}: cannot store a {type(value).__name__} in a checkpoint")


def decode(value: Any, tensors: dict) -> Any:
    if not isinstance(value, dict):
        return value
    if "tensor" in value:
        return tensors[value["tensor"]]
    if "ndarray" in value:
        import numpy

        return numpy.array(value["ndarray"], dtype=value["dtype"])
    if "dict" in value:
        return {key: decode(item, tensors) for key, item in value["dict"]}
    if "tuple" in value:
        return tuple(decode(item, tensors) for item in value["tuple"])
    return [decode(item, tensors) for item in value["list"]]


# --------------------------------------------------------------------------- optimizer state

# The state bitsandbytes allocates through Optimizer8bit.get_state_buffer (init_state, 0.50): the
# moments, the only tensors a paged optimizer pages. absmax, qmap and the rest are plain tensors.
STATE_BUFFER_KEYS = ("state1", "state2")


@dataclass(frozen=True)
class RebuiltBuffer:
    """One optimizer state tensor re-allocated by the optimizer after a load."""

    parameter: int  # index in the optimizer's parameter order
    key: str
    paged: bool  # what bitsandbytes allocated: CUDA unified memory (True) or an ordinary tensor


def load_optimizer_state(optimizer, state_dict: dict) -> list[RebuiltBuffer]:
    """optimizer.load_state_dict, then a paged bitsandbytes optimizer's moments re-allocated the way
    its own first step allocated them, with the loaded values copied in; returns those re-allocated.

    bitsandbytes' load_state_dict moves every state tensor to the parameter's device with
    `.to(device)`: ordinary CUDA tensors in torch's allocator, no longer paged, so a resumed run
    could not evict them to RAM and its memory is not the plan's (paged state outside torch's
    counters). get_state_buffer decides as it does at the first step: paged on CUDA for tensors
    of >= 1e5 elements, an ordinary zeros_like otherwise and always on CPU, where paging does
    not exist (there `paged` is False for every buffer and the copy changes no value or dtype).
    """
    import torch

    optimizer.load_state_dict(state_dict)
    if not getattr(optimizer, "is_paged", False):
        return []
    rebuilt = []
    parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    with torch.no_grad():
        for index, parameter in enumerate(parameters):
            state = optimizer.state.get(parameter, {})
            for key in STATE_BUFFER_KEYS:
                loaded = state.get(key)
                if not isinstance(loaded, torch.Tensor):
                    continue
                buffer = optimizer.get_state_buffer(parameter, dtype=loaded.dtype)
                # To torch a paged buffer is a host tensor over unified memory (get_paged wraps
                # it with torch.frombuffer): copy_ from the loaded CUDA tensor is a device-to-host
                # copy into it. The loaded tensor is freed when the state drops it below.
                buffer.copy_(loaded.view(buffer.shape))
                state[key] = buffer
                rebuilt.append(RebuiltBuffer(index, key, bool(getattr(buffer, "is_paged", False))))
    if any(buffer.paged for buffer in rebuilt):
        torch.cuda.synchronize()  # the copies into unified memory finish before the first step reads it
    return rebuilt


# --------------------------------------------------------------------------- RNG


def capture_rng() -> dict:
    """Every generator a training step may draw from (dropout uses torch's)."""
    import numpy
    import torch

    state = {"python": random.getstate(), "numpy": numpy.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    import numpy
    import torch

    random.setstate(state["python"])
    numpy.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
