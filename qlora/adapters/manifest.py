"""The compatibility record: what an adapter was trained on, kept next to it.

`adapter_config.json` carries peft's standard fields (`base_model_name_or_path`, `revision`);
`qlora_manifest.json` adds what peft has no field for: a fingerprint of the base's shape, the
quantization the adapter was trained against, library versions, and sha256 of the adapter file
and of the training data (an artifact manifest). Loading checks the record: another
architecture or shape is refused, another quantization is a one-line warning.

Plain peft ignores the side file, and an adapter without one (trained elsewhere) still loads:
its weights' shapes are checked against the base instead.
"""

from __future__ import annotations

import hashlib
import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

from pydantic import ValidationError

from qlora.config import QuantizationSection
from qlora.config.messages import first_problem
from qlora.errors import ModelError
from qlora.provenance import library_versions, sha256_file

MANIFEST_NAME = "qlora_manifest.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MANIFEST_FORMAT = 1

# Config keys that fix the shapes and meaning of the base's weights, under the names the common
# architectures use. Runtime keys (dtype, quantization_config, use_cache, transformers_version)
# change when the same base is loaded differently, so they stay out of the fingerprint.
SHAPE_KEYS = (
    "model_type",
    "architectures",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "tie_word_embeddings",
    "n_embd",
    "n_layer",
    "n_head",
    "d_model",
    "num_layers",
    "ffn_dim",
    "moe_intermediate_size",
    "num_experts",
    "num_local_experts",
)
# Checked first and named in the error, so the message says the obvious thing.
HEADLINE_KEYS = ("model_type", "architectures", "hidden_size", "n_embd", "d_model")


def base_shape(config: dict) -> dict:
    """The shape-defining part of a base's config (a multimodal config's text_config included)."""
    shape = {key: config[key] for key in SHAPE_KEYS if config.get(key) is not None}
    text_config = config.get("text_config")
    if isinstance(text_config, dict):
        shape.update({f"text_config.{key}": value for key, value in base_shape(text_config).items()})
    return shape


def fingerprint(shape: dict) -> str:
    canonical = json.dumps(shape, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def write_manifest(
    directory: Path,
    *,
    base_config: dict,
    name_or_path: str,
    revision: Optional[str],
    quantization: QuantizationSection,
    data_files: list[str],
    processes: Optional[dict] = None,
    data_formats: Optional[list[str]] = None,
) -> Path:
    """Write qlora_manifest.json into an adapter folder peft has just written, and set
    adapter_config.json's base_model_name_or_path / revision to the base as the job named it.

    `quantization` is recorded as the job's section: {bits, quant_type, double_quant, compute_dtype};
    `processes` how training was spread: {"world_size": N, "strategy": "ddp" | "fsdp"};
    `data_formats` the row formats trained on (chat, alpaca, text): how to prompt the adapter.
    """
    directory = Path(directory)
    adapter_config_path = directory / ADAPTER_CONFIG
    adapter_config = json.loads(adapter_config_path.read_text())
    adapter_config["base_model_name_or_path"] = name_or_path
    adapter_config["revision"] = revision
    adapter_config_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")

    shape = base_shape(base_config)
    weights = directory / ADAPTER_WEIGHTS
    manifest = {
        "format": MANIFEST_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base": {
            "name_or_path": name_or_path,
            "revision": revision,
            "fingerprint": fingerprint(shape),
            "shape": shape,
        },
        "quantization": quantization.model_dump(),
        "versions": library_versions(),
        "files": {ADAPTER_WEIGHTS: {"sha256": sha256_file(weights), "bytes": weights.stat().st_size}},
        "data": [data_record(name) for name in data_files],
        "data_formats": data_formats,
        "training": processes or {"world_size": 1, "strategy": "ddp"},
    }
    path = directory / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def data_record(name: str) -> dict:
    path = Path(name)
    if path.is_file():
        return {"path": str(path), "sha256": sha256_file(path), "bytes": path.stat().st_size}
    return {"path": name, "sha256": None, "note": "a cached dataset, not a file"}


def read_adapter_config(directory: Path) -> dict:
    """adapter_config.json of an adapter folder, or a one-line ModelError naming the folder."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ModelError(f"adapter folder not found: {directory}")
    path = directory / ADAPTER_CONFIG
    if not path.is_file():
        raise ModelError(f"{directory}: no {ADAPTER_CONFIG} (not a PEFT adapter folder)")
    if not (directory / ADAPTER_WEIGHTS).is_file():
        raise ModelError(f"{directory}: no {ADAPTER_WEIGHTS} (only safetensors adapters are loaded)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ModelError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
    if config.get("peft_type") != "LORA":
        raise ModelError(f"{path}: peft_type is {config.get('peft_type')!r}; only LoRA adapters are supported")
    return config


def read_manifest(directory: Path) -> Optional[dict]:
    """The side file, or None for an adapter written by plain peft."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ModelError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None


def recorded_base(directory: Path) -> Optional[str]:
    """The base the adapter names: the manifest's, else peft's base_model_name_or_path."""
    manifest = read_manifest(directory) or {}
    return manifest.get("base", {}).get("name_or_path") or read_adapter_config(directory).get("base_model_name_or_path")


def check_base(directory: Path, base_config: dict, base_name: str) -> None:
    """Refuse a base whose shape differs from the one recorded at training time."""
    manifest = read_manifest(directory)
    if manifest is None:
        return
    recorded = manifest["base"]["shape"]
    actual = base_shape(base_config)
    if fingerprint(actual) == manifest["base"]["fingerprint"]:
        return
    differing = sorted(key for key in set(recorded) | set(actual) if recorded.get(key) != actual.get(key))
    differing.sort(key=lambda key: key not in HEADLINE_KEYS)
    first = differing[0] if differing else "fingerprint"
    raise ModelError(
        f"adapter {directory} was trained on a base with {first}={recorded.get(first)!r}, but {base_name} has "
        f"{first}={actual.get(first)!r} ({len(differing)} shape keys differ); load it onto the base it was trained on"
    )


def check_quantization(directory: Path, loaded: QuantizationSection, warn: Callable[[str], None]) -> None:
    """Another quantization than training's still works, slightly differently: one warning line."""
    manifest = read_manifest(directory)
    if manifest is None:
        return
    trained = recorded_quantization(manifest, directory).describe(compute=False)
    if trained != loaded.describe(compute=False):
        warn(
            f"warning: adapter {directory} was trained on a {trained} base, "
            f"now loaded as {loaded.describe(compute=False)}; outputs will differ slightly"
        )


def recorded_quantization(manifest: Optional[dict], directory: Path) -> QuantizationSection:
    """The quantization a manifest records (the job's quantization section); the section's
    defaults (NF4 + double quant) where it records none."""
    recorded = (manifest or {}).get("quantization") or {}
    try:
        return QuantizationSection(
            **{key: value for key, value in recorded.items() if key in QuantizationSection.model_fields}
        )
    except ValidationError as error:
        key, message = first_problem(error, QuantizationSection)
        raise ModelError(f"{Path(directory) / MANIFEST_NAME}: recorded quantization.{message}") from None


def check_adapter_file(directory: Path, warn: Callable[[str], None]) -> None:
    """Warn if the weights are not the file training wrote (edited, re-saved, truncated)."""
    manifest = read_manifest(directory)
    recorded = (manifest or {}).get("files", {}).get(ADAPTER_WEIGHTS, {}).get("sha256")
    if recorded and sha256_file(Path(directory) / ADAPTER_WEIGHTS) != recorded:
        warn(f"warning: {Path(directory) / ADAPTER_WEIGHTS} differs from the file training wrote (sha256 mismatch)")


def stderr_warning(line: str) -> None:
    print(line, file=sys.stderr)
