"""A base's module tree without its weights (meta device): which weights are tied, and which
ones transformers' 4-bit quantizer would turn into NF4, read from config.json alone.

The streamed merge works on checkpoint tensors by name; these answers come from the same
module tree `from_pretrained` builds, so they follow the architecture, not a table of names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from qlora.config import QuantizationSection
from qlora.errors import ModelError
from qlora.model.base import first_line
from qlora.plan.architecture import load_hf_config, meta_skeleton


def quantizable_skeleton(config_dir: Path, quantization: Optional[QuantizationSection] = None):
    """The causal LM of `config_dir`'s config.json on the meta device (no memory). With a 4-bit
    `quantization`, its linears are swapped for Linear4bit by transformers' own quantizer."""
    import torch

    hf_config = load_hf_config(Path(config_dir))
    dtype = getattr(torch, quantization.compute_dtype) if quantization is not None else torch.float32
    try:
        model = meta_skeleton(hf_config, dtype)
    except (ValueError, KeyError) as error:
        raise ModelError(
            f"{config_dir}/config.json: transformers cannot build this model ({first_line(error)})"
        ) from None
    if quantization is not None and quantization.bits == 4:
        from qlora.model.random_init import four_bit_quantizer

        four_bit_quantizer(model, quantization.quant_type, quantization.double_quant, dtype, torch.device("cpu"))
    return model


def tied_weight_aliases(model) -> dict[str, str]:
    """{tied parameter name: the name it shares its tensor with}, e.g. lm_head.weight ->
    model.embed_tokens.weight; a checkpoint stores the second one only."""
    tied = getattr(model, "all_tied_weights_keys", None)
    if tied is not None:
        return dict(tied)
    groups: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(parameter), []).append(name)
    return {alias: names[0] for names in groups.values() for alias in names[1:]}


def four_bit_weights(model) -> dict[str, object]:
    """{weight name: its meta Params4bit} of a skeleton built with a 4-bit quantization: the
    weights training saw in NF4, with the block size and double-quant settings they had."""
    return {
        f"{name}.weight": module.weight
        for name, module in model.named_modules()
        if module.__class__.__name__ == "Linear4bit"
    }


def nf4_round_trip(value, meta_parameter, dtype):
    """`value` quantized as transformers quantizes a weight on load (bitsandbytes Params4bit
    with the skeleton's settings) and dequantized again, in `dtype`."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_functional

    quantized = bnb.nn.Params4bit(value.to(dtype), requires_grad=False, **meta_parameter.__dict__).to("cpu")
    return bnb_functional.dequantize_4bit(quantized.data, quantized.quant_state).to(dtype)
