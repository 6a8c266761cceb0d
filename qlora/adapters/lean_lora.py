"""LoRA's training forward as one autograd function: the input kept once, a 1-byte dropout mask.

peft computes a LoRA update as `lora_B(lora_A(dropout(x.float()))) * scaling`: every target casts
its input to float32, and autograd keeps per target the float32 dropout mask and the float32
dropped input, 8 bytes per input element. On bench/compare.py's 24-layer fixture (compute
bfloat16, no checkpointing, a 600-token micro-batch) that was 616 of the 856 MiB saved for
backward. Here the update is computed in the activations' dtype (the compute dtype, as autocast
does on a GPU); the weights stay float32 and their gradients arrive in float32. Autograd keeps
the input once (q/k/v share theirs, gate/up theirs), a bool mask per target and the r-wide A
output; the backward recomputes the dropped input from them.

Only the plain case takes this path: training with grad enabled, vanilla LoRA (no DoRA or other
peft variant), one active adapter, adapter weights in plain nn.Linear (not FSDP units, whose
hooks must gather their shards). Everything else, eval and generation included, runs peft's
own forward unchanged.
"""

from __future__ import annotations

from types import MethodType
from typing import Optional

import torch

from qlora.adapters.dropout import keep_mask


class LoraUpdate(torch.autograd.Function):
    """scaling * B(A(keep * keep_scale * x)), computed in x's dtype."""

    @staticmethod
    def forward(ctx, x, weight_a, weight_b, scaling: float, keep: Optional[torch.Tensor], keep_scale: float):
        dropped = x if keep is None else x * keep * keep_scale
        down = dropped @ weight_a.to(x.dtype).t()
        ctx.save_for_backward(x, keep, weight_a, weight_b, down)
        ctx.scaling, ctx.keep_scale = scaling, keep_scale
        return (down @ weight_b.to(x.dtype).t()) * scaling

    @staticmethod
    def backward(ctx, grad_output):
        x, keep, weight_a, weight_b, down = ctx.saved_tensors
        grad_output = grad_output.to(x.dtype) * ctx.scaling
        grad_down = grad_output @ weight_b.to(x.dtype)
        dropped = x if keep is None else x * keep * ctx.keep_scale
        # Weight gradients summed over every token (all leading dims), delivered in float32.
        grad_b = (grad_output.flatten(0, -2).t() @ down.flatten(0, -2)).to(weight_b.dtype)
        grad_a = (grad_down.flatten(0, -2).t() @ dropped.flatten(0, -2)).to(weight_a.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_down @ weight_a.to(x.dtype)
            if keep is not None:
                grad_x = grad_x * keep * ctx.keep_scale
        return grad_x, grad_a, grad_b, None, None, None


def lean_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A peft LoRA linear's forward: the lean path where it applies, peft's otherwise."""
    adapter = lean_adapter(self, kwargs)
    if adapter is None or not (self.training and torch.is_grad_enabled()):
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        x = x.to(torch.get_autocast_dtype(device_type))
    dropout = self.lora_dropout[adapter]
    p = getattr(dropout, "p", 0.0) if dropout.training else 0.0
    keep, keep_scale = keep_mask(x, p) if p > 0 else (None, 1.0)
    lora_a, lora_b = self.lora_A[adapter], self.lora_B[adapter]
    update = LoraUpdate.apply(x, lora_a.weight, lora_b.weight, self.scaling[adapter], keep, keep_scale)
    return result + update.to(result.dtype)


def lean_adapter(layer, kwargs: dict) -> Optional[str]:
    """The one active adapter when the lean path computes exactly what peft's forward would."""
    if kwargs.get("adapter_names") is not None or layer.disable_adapters or layer.merged:
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1 or active[0] in layer.lora_variant:
        return None
    adapter = active[0]
    plain = all(type(module[adapter]) is torch.nn.Linear for module in (layer.lora_A, layer.lora_B))
    if not plain or layer.lora_A[adapter].bias is not None or layer.lora_B[adapter].bias is not None:
        return None
    return adapter


def use_lean_lora(peft_model) -> int:
    """Give every LoRA linear of the model the lean forward; returns how many."""
    from peft.tuners.lora import Linear as LoraLinear

    layer_types = [LoraLinear]
    try:
        from peft.tuners.lora.bnb import Linear4bit, Linear8bitLt

        layer_types += [Linear4bit, Linear8bitLt]
    except ImportError:  # peft without bitsandbytes: only 16-bit bases
        pass
    swapped = 0
    for module in peft_model.modules():
        if type(module) in layer_types:
            module.forward = MethodType(lean_forward, module)
            swapped += 1
    return swapped
