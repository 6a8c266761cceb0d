"""LoRA adapters: attach to a frozen base, save in PEFT format.

The adapter directory we write is plain PEFT (adapter_config.json + adapter_model.safetensors),
so `peft.PeftModel.from_pretrained` loads it with no qlora installed.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional, Union

from qlora.config import LoraSection


def attach_lora(model, lora: LoraSection, *, seed: int):
    """Wrap the frozen base with trainable LoRA weights kept in float32, as the lora section says.

    "all-linear" is peft's own rule: every linear layer except the output head. The seed makes
    the A-matrix init reproducible regardless of what ran before.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    lora_config = LoraConfig(
        task_type="CAUSAL_LM",
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        bias="none",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, lora_config, autocast_adapter_dtype=True)
    # Adapters train in float32 even when the base computes in bf16: small updates to a
    # bf16 weight would round away.
    for parameter in peft_model.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
    from qlora.adapters.dropout import use_cheap_mask_dropout
    from qlora.adapters.lean_lora import use_lean_lora

    use_cheap_mask_dropout(peft_model)  # 2.4x cheaper masks on CPU (see its module)
    use_lean_lora(peft_model)  # no float32 copies of the activations kept for backward (see its module)
    return peft_model


REFERENCE = "reference"
"""The adapter name DPO's frozen reference adapter is loaded under, beside peft's "default"."""


def add_reference_adapter(peft_model, directory: Union[str, Path]) -> None:
    """Load a frozen second adapter for DPO's reference (`reference_adapter_active` switches to it).
    Its dropout is off: the reference must score a pair the same way every time it sees it."""
    import torch

    peft_model.load_adapter(str(directory), adapter_name=REFERENCE, is_trainable=False)
    for module in peft_model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict) and REFERENCE in dropouts:
            dropouts[REFERENCE] = torch.nn.Identity()


@contextlib.contextmanager
def reference_adapter_active(peft_model):
    """Every LoRA layer computes with the reference adapter inside the block. The layers' active
    adapter is set directly: peft's set_adapter would also re-flag which adapter trains."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [module for module in peft_model.modules() if isinstance(module, BaseTunerLayer)]
    active = [layer._active_adapter for layer in layers]
    try:
        for layer in layers:
            layer._active_adapter = [REFERENCE]
        yield
    finally:
        for layer, names in zip(layers, active):
            layer._active_adapter = names


def save_adapter(peft_model, directory: Union[str, Path], state_dict: Optional[dict] = None) -> Path:
    """Write adapter_model.safetensors + adapter_config.json; returns the weights file.

    state_dict: the adapter's whole tensors under the file's names, for a sharded model
    (qlora.training.fsdp.adapter_state_dict, gathered on every rank; rank 0 saves). peft's own
    save_pretrained cannot take them: it picks a state dict's adapter keys by the model's module
    names, which FSDP's nested wrappers change. By default the peft model's own tensors."""
    directory = Path(directory)
    if state_dict is None:
        # Only the trained adapter: a DPO reference adapter beside it is an input, not a result.
        peft_model.save_pretrained(str(directory), safe_serialization=True, selected_adapters=["default"])
    else:
        write_adapter_files(peft_model, directory, state_dict)
    return directory / "adapter_model.safetensors"


def write_adapter_files(peft_model, directory: Path, state_dict: dict) -> None:
    """What peft's save_pretrained writes for one LoRA adapter: its config (in inference mode)
    and its tensors, with the safetensors metadata peft reads."""
    import copy

    from safetensors.torch import save_file

    config = copy.copy(peft_model.peft_config[peft_model.active_adapter])
    config.inference_mode = True
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(directory))
    tensors = {key: tensor.detach().cpu().contiguous() for key, tensor in state_dict.items()}
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})


def load_adapter_weights(peft_model, directory: Union[str, Path]) -> None:
    """Load adapter_model.safetensors into the model's active adapter, strictly.

    peft's own loader skips keys it does not recognise and leaves missing ones at their init
    values, silently; a resumed run would then train a different adapter. Here every saved key
    must match a trainable tensor of the same shape, and every adapter tensor must be loaded.
    `peft_model` may be FSDP-wrapped (qlora.training.fsdp): then every rank calls this at once, after
    the wrapped model's first forward (FSDP initializes its root lazily there; a job instead loads a
    checkpoint's adapter on rank 0 before sharding: qlora.job.placement).
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from qlora.errors import CheckpointError
    from qlora.training import fsdp

    read_state, write_state = (
        (fsdp.adapter_state_dict, fsdp.load_adapter_state_dict)
        if fsdp.is_sharded(peft_model)
        else (get_peft_model_state_dict, set_peft_model_state_dict)
    )

    path = Path(directory) / "adapter_model.safetensors"
    try:
        saved = load_file(str(path))
    except (OSError, SafetensorError) as error:
        raise CheckpointError(f"{path}: unreadable adapter ({error})") from None
    expected = read_state(peft_model)
    missing = sorted(expected.keys() - saved.keys())
    unexpected = sorted(saved.keys() - expected.keys())
    reshaped = sorted(key for key in expected.keys() & saved.keys() if expected[key].shape != saved[key].shape)
    if missing or unexpected or reshaped:
        problems = [
            f"{len(found)} {what} (first: {found[0]})"
            for what, found in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches", reshaped),
            )
            if found
        ]
        raise CheckpointError(f"{path}: adapter does not match the model: " + ", ".join(problems))
    write_state(peft_model, saved)
    loaded = read_state(peft_model)
    unequal = [key for key in expected if not loaded[key].to(saved[key].dtype).cpu().equal(saved[key])]
    if unequal:
        raise CheckpointError(f"{path}: {len(unequal)} adapter tensors did not load (first: {unequal[0]})")
