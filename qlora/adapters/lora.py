"""LoRA adapters: attach to a frozen base, save in PEFT format.

The adapter directory we write is plain PEFT (adapter_config.json + adapter_model.safetensors),
so `peft.PeftModel.from_pretrained` loads it with no qlora installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

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

    use_cheap_mask_dropout(peft_model)  # 2.4x cheaper masks on CPU (see its module)
    return peft_model


def save_adapter(peft_model, directory: Union[str, Path]) -> Path:
    """Write adapter_model.safetensors + adapter_config.json; returns the weights file."""
    directory = Path(directory)
    peft_model.save_pretrained(str(directory), safe_serialization=True)
    return directory / "adapter_model.safetensors"


def load_adapter_weights(peft_model, directory: Union[str, Path]) -> None:
    """Load adapter_model.safetensors into the model's active adapter, strictly.

    peft's own loader skips keys it does not recognise and leaves missing ones at their init
    values, silently; a resumed run would then train a different adapter. Here every saved key
    must match a trainable tensor of the same shape, and every adapter tensor must be loaded.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from qlora.errors import CheckpointError

    path = Path(directory) / "adapter_model.safetensors"
    try:
        saved = load_file(str(path))
    except (OSError, SafetensorError) as error:
        raise CheckpointError(f"{path}: unreadable adapter ({error})") from None
    expected = get_peft_model_state_dict(peft_model)
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
    set_peft_model_state_dict(peft_model, saved)
    loaded = get_peft_model_state_dict(peft_model)
    unequal = [key for key in expected if not loaded[key].to(saved[key].dtype).cpu().equal(saved[key])]
    if unequal:
        raise CheckpointError(f"{path}: {len(unequal)} adapter tensors did not load (first: {unequal[0]})")
