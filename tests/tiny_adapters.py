"""The tiny model as a plain peft / transformers user has it: adapters made by peft, a 4-bit base
loaded by transformers + bitsandbytes. No qlora code, no manifest."""

from __future__ import annotations

from pathlib import Path


def plain_peft_adapter(
    model_dir: Path,
    directory: Path,
    seed: int = 0,
    r: int = 4,
    alpha: float = 8,
    spread: float = 0.05,
    target_modules="all-linear",
    **options,
) -> Path:
    """A LoRA adapter on every linear layer (or `target_modules`) with random non-zero B (peft
    starts B at zero), so it really changes the outputs; written by peft's own save_pretrained.
    options: more LoraConfig settings (use_rslora, rank_pattern, modules_to_save, use_dora ...)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    torch.manual_seed(seed)
    model = get_peft_model(
        base, LoraConfig(r=r, lora_alpha=alpha, target_modules=target_modules, lora_dropout=0.0, **options)
    )
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "lora_embedding" in name:  # peft zeroes an embedding's A, not its B
                parameter.normal_(0.0, spread)
            elif "modules_to_save" in name:  # a fully trained copy: moved away from the base
                parameter.add_(torch.randn_like(parameter) * spread)
    model.save_pretrained(str(directory))
    return directory


def lora_pairs(model):
    """{module path: (lora_A Linear, lora_B Linear)} of a peft model's default adapter."""
    return {
        name: (module.lora_A["default"], module.lora_B["default"])
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {})
    }


def plain_4bit_base(model_dir: Path):
    """The model as transformers loads it in 4-bit (NF4, double quant, float32 compute) from its
    safetensors file, with bitsandbytes' AVX512-BF16 CPU kernel off: that kernel repacks the
    weights in place on the first no-grad forward and rounds differently (~2e-3), so logits
    compared with our loads go through the same kernel."""
    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), quantization_config=quantization, dtype=torch.float32, use_safetensors=True
    )
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def peft_merged(base_dir, adapter_dir):
    """The reference: plain peft's merge_and_unload in float32, no qlora code."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().eval()
