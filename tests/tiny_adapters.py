"""Adapters made directly with plain peft on the tiny model: no qlora code, no manifest."""

from __future__ import annotations

from pathlib import Path


def plain_peft_adapter(
    model_dir: Path, directory: Path, seed: int = 0, r: int = 4, alpha: float = 8, spread: float = 0.05
) -> Path:
    """A LoRA adapter on every linear layer with random non-zero B (peft starts B at zero), so it
    really changes the outputs; written by peft's own save_pretrained."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear", lora_dropout=0.0))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, spread)
    model.save_pretrained(str(directory))
    return directory


def lora_pairs(model):
    """{module path: (lora_A Linear, lora_B Linear)} of a peft model's default adapter."""
    return {
        name: (module.lora_A["default"], module.lora_B["default"])
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {})
    }
