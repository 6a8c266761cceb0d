"""A 16-bit base as files on disk: its folder, its safetensors shards and the tensors each holds.

The streamed merge reads the base file by file and never builds the model, so it needs the
checkpoint's own layout: which shard holds which tensor, with what shape and dtype. Only the
safetensors headers are read here (a few KB per shard), whatever the model's size.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from qlora.errors import ModelError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# What a merged folder needs from a hub snapshot: weights, configs, tokenizer files.
SNAPSHOT_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]


@dataclass(frozen=True)
class StoredTensor:
    shard: Path
    shape: tuple[int, ...]
    dtype: str
    """safetensors' dtype name: F32, BF16, F16, I64 ..."""


def resolve_base_dir(base: str, revision: Optional[str] = None) -> Path:
    """The local folder of `base`: the folder itself, or a hub id's snapshot in the local cache
    (downloaded first unless HF_HUB_OFFLINE is set; offline, an absent snapshot is one line)."""
    path = Path(base).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"--base: {base} has no config.json (not a Hugging Face model folder)")
        return path
    if path.is_absolute() or base.count("/") != 1:
        raise ModelError(f"--base: folder not found: {base}")
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        return Path(
            snapshot_download(base, revision=revision, allow_patterns=SNAPSHOT_PATTERNS, local_files_only=offline)
        )
    except Exception as error:  # the hub client's many error types all mean "no usable snapshot"
        where = "in the local cache (offline)" if offline else "locally or on the hub"
        raise ModelError(f"--base {base}: no snapshot {where}: {type(error).__name__}") from None


def base_shards(base_dir: Path) -> list[Path]:
    """The safetensors files of a model folder, in the index's order (one file: model.safetensors)."""
    index = base_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError):
            raise ModelError(f"{index}: not a safetensors index (no weight_map)") from None
        shards = list(dict.fromkeys(weight_map.values()))
        missing = [name for name in shards if not (base_dir / name).is_file()]
        if missing:
            raise ModelError(f"{index} names {missing[0]}, which is not in {base_dir} ({len(missing)} missing)")
        return [base_dir / name for name in shards]
    if (base_dir / SINGLE_FILE).is_file():
        return [base_dir / SINGLE_FILE]
    raise ModelError(f"{base_dir}: no {SINGLE_FILE} or {INDEX_FILE} (merging reads safetensors weights only)")


def tensor_layout(shards: list[Path]) -> dict[str, StoredTensor]:
    """Every tensor of the checkpoint: where it is stored, its shape and dtype (headers only)."""
    from safetensors import safe_open

    layout: dict[str, StoredTensor] = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as handle:
            for key in handle.keys():
                stored = handle.get_slice(key)
                layout[key] = StoredTensor(shard, tuple(stored.get_shape()), stored.get_dtype())
    return layout


def checkpoint_bytes(shards: list[Path]) -> int:
    return sum(shard.stat().st_size for shard in shards)
