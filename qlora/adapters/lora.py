"""LoRA adapters: attach to a frozen base, save in PEFT format.

The adapter directory we write is plain PEFT (adapter_config.json + adapter_model.safetensors),
so `peft.PeftModel.from_pretrained` loads it with no qlora installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union


def attach_lora(
    model,
    *,
    r: int,
    alpha: float,
    dropout: float,
    target_modules: Union[str, list[str]],
    use_rslora: bool = False,
    use_dora: bool = False,
    seed: int = 0,
):
    """Wrap the frozen base with trainable LoRA weights kept in float32.

    "all-linear" is peft's own rule: every linear layer except the output head. The seed makes
    the A-matrix init reproducible regardless of what ran before.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    lora_config = LoraConfig(
        task_type="CAUSAL_LM",
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        use_rslora=use_rslora,
        use_dora=use_dora,
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
    return peft_model


def save_adapter(peft_model, directory: Union[str, Path]) -> Path:
    """Write adapter_model.safetensors + adapter_config.json; returns the weights file."""
    directory = Path(directory)
    peft_model.save_pretrained(str(directory), safe_serialization=True)
    return directory / "adapter_model.safetensors"
