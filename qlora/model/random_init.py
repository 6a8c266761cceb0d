"""A base model with random weights built straight into 4-bit: `model.init: random`.

Proves memory and speed at real size (Llama-3.3-70B on one GPU) without downloading 140 GB:
only config.json is read. The 16-bit model never exists: the skeleton is built on the meta
device, its linears are swapped for bitsandbytes Linear4bit by transformers' own quantizer (so
the result is the same module tree `from_pretrained` gives, and peft treats it the same way),
then each weight is drawn in the compute dtype and quantized at once, one linear at a time, so
at most one 16-bit matrix is alive. transformers and bitsandbytes are imported lazily.
"""

from __future__ import annotations

import sys

from qlora.config import QuantizationSection
from qlora.errors import ModelError
from qlora.plan.architecture import load_hf_config, resolve_config_dir


def build_random_base(
    source: str,
    quantization: QuantizationSection,
    *,
    seed: int = 0,
    trust_remote_code: bool = False,
    device=None,
    quant_storage=None,
):
    """The causal LM of `source`'s config.json with random weights: 4-bit linears (bits 4) or
    all weights in the compute dtype (bits None); embeddings, norms and head in the compute dtype."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    bits, compute_dtype = quantization.bits, quantization.compute_dtype
    if bits not in (4, None):
        raise ModelError("model.init random: supports quantization.bits 4 or none")
    hf_config = load_hf_config(resolve_config_dir(source), trust_remote_code)
    dtype = getattr(torch, compute_dtype)
    device = torch.device(device) if device is not None else default_device()
    # Parameters on meta (no memory); buffers (rotary tables) are computed for real, they are small.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, trust_remote_code=trust_remote_code)
    quantizer = (
        four_bit_quantizer(model, quantization.quant_type, quantization.double_quant, dtype, device, quant_storage)
        if bits == 4
        else None
    )

    std = getattr(hf_config.get_text_config(), "initializer_range", None) or 0.02
    with torch.no_grad():
        materialize_modules(model, dtype, device, std, torch.Generator(device=device).manual_seed(seed))
    leftover = [name for name, parameter in model.named_parameters() if parameter.is_meta]
    if leftover:
        raise ModelError(f"model.init random: could not build {leftover[0]} for {source}")
    if device.type == "cuda":
        # As from_pretrained(device_map={"": index}) leaves it: peft and generate read the placement.
        model.hf_device_map = {"": device.index}
    if quantizer is not None:
        model.hf_quantizer = quantizer
        quantizer.postprocess_model(model)
    model.eval()  # as from_pretrained leaves it; the loop switches to train()
    return model


def materialize_modules(model, dtype, device, std: float, generator) -> None:
    """Every meta parameter and buffer made real on `device`, module by module (at most one
    16-bit linear weight alive); what is not a 4-bit weight gets the architecture's own init."""
    from tqdm.auto import tqdm

    materialized = {}  # tied weights are one tensor: build it once
    modules = [
        module
        for module in model.modules()
        if next(module.parameters(recurse=False), None) is not None
        or next(module.buffers(recurse=False), None) is not None
    ]
    for module in tqdm(modules, desc="random base", unit="module", file=sys.stderr, dynamic_ncols=True, leave=False):
        for name, buffer in list(module.named_buffers(recurse=False)):
            module._buffers[name] = buffer.to(device)
        fresh = False
        for name, parameter in list(module.named_parameters(recurse=False)):
            if id(parameter) not in materialized:
                materialized[id(parameter)] = materialize(parameter, dtype, device, std, generator)
                fresh = fresh or not is_4bit(parameter)
            module._parameters[name] = materialized[id(parameter)]
        if fresh and not is_4bit_linear(module):
            model._init_weights(module)  # the architecture's own init: norms to 1 (0 for Gemma), embeddings ~N(0, std)
        elif fresh and module.bias is not None:
            module.bias.zero_()


def materialize(parameter, dtype, device, std: float, generator):
    """A meta parameter made real: 4-bit weights drawn ~N(0, std) then quantized at once; others
    left for _init_weights."""
    import torch

    if is_4bit(parameter):
        import bitsandbytes as bnb

        value = torch.empty(parameter.shape, dtype=dtype, device=device).normal_(0.0, std, generator=generator)
        quantized = bnb.nn.Params4bit(value, requires_grad=False, **parameter.__dict__).to(device)
        del value  # the only 16-bit copy of this weight
        return quantized
    return torch.nn.Parameter(torch.empty(parameter.shape, dtype=parameter.dtype, device=device), requires_grad=False)


def four_bit_quantizer(model, quant_type: str, double_quant: bool, dtype, device, quant_storage=None):
    """transformers' bitsandbytes quantizer swaps nn.Linear for Linear4bit on the meta skeleton
    (not the head); quant_storage: the packed bytes' dtype name (default uint8)."""
    import torch
    from transformers import BitsAndBytesConfig
    from transformers.quantizers import AutoHfQuantizer

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=getattr(torch, quant_storage or "uint8"),
    )
    quantizer = AutoHfQuantizer.from_config(config, pre_quantized=False)
    quantizer.preprocess_model(
        model=model, dtype=dtype, device_map={"": device}, checkpoint_files=None, use_kernels=False
    )
    return quantizer


def is_4bit(parameter) -> bool:
    return parameter.__class__.__name__ == "Params4bit"


def is_4bit_linear(module) -> bool:
    return module.__class__.__name__ == "Linear4bit"


def default_device():
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
