"""The adapters a job starts from, checked before anything loads: `model.adapter` (the job trains
it on, e.g. SFT -> DPO) and DPO's `model.reference_adapter` (frozen).

Each must be a LoRA folder made for this base: the manifest's shape fingerprint when it has one,
and every tensor's shape against the base's module tree built from config.json on the meta
device (no weights). `model.adapter`'s LoRA shape becomes the job's lora section, so the resolved
config.yaml says what trains; a lora key the job sets to something else is a one-line error,
since the adapter's tensors fix it (only lora.dropout, a training setting, may change).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from qlora.adapters.loading import check_shapes
from qlora.adapters.manifest import check_base, check_quantization, read_adapter_config
from qlora.config import JobConfig, LoraSection
from qlora.errors import ConfigError, QloraError
from qlora.model.skeleton import quantizable_skeleton
from qlora.plan.architecture import load_hf_config, resolve_config_dir

# adapter_config.json key -> lora section key: what fixes the adapter's tensors and its scale.
SHAPE_KEYS = {
    "r": "r",
    "lora_alpha": "alpha",
    "target_modules": "target_modules",
    "use_rslora": "use_rslora",
    "use_dora": "use_dora",
}
# What peft adapters may carry that a job's lora section cannot say: refused, not dropped.
UNSUPPORTED = ("rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform", "trainable_token_indices")


def check_start_adapters(config: JobConfig, echo: Callable[[str], None]) -> None:
    """Both folders checked against the base; the job's lora section set from model.adapter."""
    model = config.model
    if model.adapter is None and model.reference_adapter is None:
        return
    config_dir = resolve_config_dir(model.name_or_path)
    hf_config = load_hf_config(config_dir, model.trust_remote_code)
    skeleton = quantizable_skeleton(config_dir)
    for key in ("adapter", "reference_adapter"):
        directory = getattr(model, key)
        if directory is None:
            continue
        try:
            adapter_config = read_adapter_config(Path(directory))
            refuse_unsupported(adapter_config, Path(directory))
            check_base(Path(directory), hf_config.to_dict(), model.name_or_path)
            check_shapes(skeleton, Path(directory))
        except QloraError as error:
            raise type(error)(f"model.{key}: {error}") from None
        check_quantization(Path(directory), config.quantization, echo)
    if model.adapter is not None:
        config.lora = adapter_lora(read_adapter_config(Path(model.adapter)), config.lora, model.adapter, skeleton)


def refuse_unsupported(adapter_config: dict, directory: Path) -> None:
    for key in UNSUPPORTED:
        if adapter_config.get(key):
            raise ConfigError(
                f"{directory}: its adapter_config.json sets {key}; jobs start from plain LoRA adapters only"
            )
    if adapter_config.get("bias", "none") != "none":
        raise ConfigError(f"{directory}: its adapter_config.json trains biases (bias: {adapter_config['bias']})")
    if not isinstance(adapter_config.get("target_modules"), (list, tuple)):
        raise ConfigError(
            f"{directory}: target_modules {adapter_config.get('target_modules')!r} is not a list of module names"
        )


def adapter_lora(adapter_config: dict, job_lora: LoraSection, directory: str, skeleton) -> LoraSection:
    """The lora section that rebuilds this adapter; the job's explicit keys must agree with it."""
    values = {ours: adapter_config.get(theirs) for theirs, ours in SHAPE_KEYS.items()}
    values["target_modules"] = sorted(values["target_modules"])
    values["use_rslora"], values["use_dora"] = bool(values["use_rslora"]), bool(values["use_dora"])
    for key in sorted(job_lora.model_fields_set - {"dropout"}):
        asked = getattr(job_lora, key)
        if key == "target_modules" and asked == "all-linear":
            asked = all_linear_names(skeleton)
        elif key == "target_modules":
            asked = sorted(asked)
        if asked != values[key]:
            raise ConfigError(
                f"lora.{key}: {getattr(job_lora, key)!r}, but model.adapter {directory} was trained with "
                f"{values[key]!r}; remove lora.{key} (the adapter's tensors fix it)"
            )
    dropout = job_lora.dropout if "dropout" in job_lora.model_fields_set else adapter_config.get("lora_dropout", 0.0)
    return LoraSection(**values, dropout=dropout)


def all_linear_names(skeleton) -> list[str]:
    """peft's all-linear: the names of every linear layer but the output head."""
    import torch

    head = skeleton.get_output_embeddings()
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in skeleton.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not head
    }
    return sorted(names)
