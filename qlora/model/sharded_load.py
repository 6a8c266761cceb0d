"""The frozen base for FSDP: rank 0 alone reads the checkpoint, the other ranks build an empty skeleton.

Host memory must not grow with the number of processes, so only rank 0 loads (and quantizes)
the weights, into host memory. Every other rank receives the model's config from rank 0 (it
never opens the model folder) and builds the same module tree on the meta device, its linears
swapped for bitsandbytes Linear4bit by transformers' own quantizer. FSDP's `sync_module_states`
then materializes each wrapped unit (qlora.training.fsdp: `to_empty`), broadcasts rank 0's
parameters and buffers, and keeps each rank's shard.

A 4-bit weight's quantization state (absmax, nested absmax, code, offset) is neither a
parameter nor a buffer, so FSDP never sends it: rank 0 broadcasts it here, tensor by tensor,
into states of the same shapes on the other ranks. Those states stay on each module
(`Linear4bit.quant_state`), where bitsandbytes looks for them when FSDP hands the layer a
plain flat-parameter view instead of its Params4bit (`fix_4bit_weight_quant_state_from_module`).

The packed 4-bit bytes are stored as the compute dtype (`bnb_4bit_quant_storage`): FSDP flattens
a decoder layer's tensors into one tensor of one dtype, and the layer's norms are in that dtype.
"""

from __future__ import annotations

import copy
from typing import Union

from qlora.config import ModelSection, QuantizationSection
from qlora.model.base import freeze_for_training, load_base
from qlora.model.random_init import default_device, four_bit_quantizer
from qlora.model.row_attention import BatchLayout


def load_sharded_base(
    source: ModelSection,
    quantization: QuantizationSection,
    *,
    gradient_checkpointing: Union[bool, str],
    seed: int = 0,
    device=None,
    layout: BatchLayout = BatchLayout(),
):
    """The base for FSDP on every rank of the default process group: rank 0's real (in host
    memory), the others' a meta skeleton whose 4-bit quantization states are rank 0's, on
    `device` (default: the current GPU, or the CPU); `layout`: as load_base's. Call it on every rank at
    once (collectives)."""
    import torch
    import torch.distributed as dist

    device = torch.device(device) if device is not None else default_device()
    storage = quantization.compute_dtype if quantization.bits == 4 else None
    if dist.get_rank() == 0:
        model = load_base(
            source,
            quantization,
            gradient_checkpointing=gradient_checkpointing,
            seed=seed,
            quant_storage=storage,
            on_cpu=True,
            layout=layout,
        )
        shared = [model.config, quant_state_layout(model)]
    else:
        model, shared = None, [None, None]
    dist.broadcast_object_list(shared, src=0)
    hf_config, states = shared
    if model is None:
        model = empty_skeleton(hf_config, quantization, states, source.trust_remote_code, storage)
        freeze_for_training(model, gradient_checkpointing, quantization.compute_dtype, layout)
    broadcast_quant_states(model, device)
    return model


def quant_state_layout(model) -> dict:
    """{module name: (packed weight shape, its dtype, its QuantState with meta tensors)} of every
    4-bit linear: what another rank needs to build the same weight, without its values."""
    return {
        name: (tuple(module.weight.shape), module.weight.dtype, meta_copy(module.weight.quant_state))
        for name, module in four_bit_linears(model)
    }


def meta_copy(state):
    """A QuantState like `state` (nested state included) whose tensors are on the meta device."""
    import torch

    copied = copy.copy(state)
    if getattr(state, "nested", False):
        copied.state2 = copy.copy(state.state2)
    for owner, field in tensor_fields(copied):
        setattr(owner, field, torch.empty_like(getattr(owner, field), device="meta"))
    return copied


def tensor_fields(state) -> list:
    """(object, attribute) of every tensor of a QuantState, in a fixed order (the broadcast's)."""
    fields = [(state, "absmax"), (state, "code")]
    if getattr(state, "nested", False):
        fields += [(state, "offset"), (state.state2, "absmax"), (state.state2, "code")]
    return fields


def empty_skeleton(hf_config, quantization: QuantizationSection, states: dict, trust_remote_code: bool, storage):
    """The module tree rank 0 loaded, on the meta device: every 4-bit weight a packed meta
    Params4bit of rank 0's shape, with a real (still empty) QuantState on the module."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, quantization.compute_dtype)
    # Buffers too on meta: FSDP's param_init_fn + sync_module_states fill them from rank 0. Rank 0's
    # config names our row attention, registered in rank 0's process only: freeze_for_training
    # switches the skeleton to it as load_base did on rank 0.
    with init_empty_weights(include_buffers=True):
        model = AutoModelForCausalLM.from_config(
            hf_config, dtype=dtype, trust_remote_code=trust_remote_code, attn_implementation="sdpa"
        )
    if quantization.bits == 4:
        quantizer = four_bit_quantizer(
            model, quantization.quant_type, quantization.double_quant, dtype, "cpu", quant_storage=storage
        )
        for name, module in four_bit_linears(model):
            shape, packed_dtype, meta_state = states[name]
            set_packed_weight(module, shape, packed_dtype, meta_state)
        model.hf_quantizer = quantizer
        quantizer.postprocess_model(model)
    model.eval()  # as from_pretrained leaves it
    return model


def set_packed_weight(module, shape: tuple, packed_dtype, meta_state) -> None:
    import bitsandbytes as bnb
    import torch

    state = meta_state  # unpickled for this rank: no other module shares it
    weight = module.weight
    module.weight = bnb.nn.Params4bit(
        torch.empty(shape, dtype=packed_dtype, device="meta"),
        requires_grad=False,
        quant_state=state,
        blocksize=state.blocksize,
        compress_statistics=getattr(state, "nested", False),
        quant_type=weight.quant_type,
        quant_storage=packed_dtype,
        module=module,
        bnb_quantized=True,
    )
    module.quant_state = state


def broadcast_quant_states(model, device) -> None:
    """Every 4-bit linear's quantization state moved to `device` and filled with rank 0's values."""
    import torch
    import torch.distributed as dist

    for _, module in four_bit_linears(model):
        state = module.quant_state
        for owner, field in tensor_fields(state):
            tensor = getattr(owner, field)
            tensor = tensor.to(device) if not tensor.is_meta else torch.empty_like(tensor, device=device)
            dist.broadcast(tensor, src=0)
            setattr(owner, field, tensor)
        module.weight.quant_state = state


def four_bit_linears(model) -> list:
    """(name, module) of every bitsandbytes Linear4bit, in module order (the same on every rank)."""
    return [(name, module) for name, module in model.named_modules() if module.__class__.__name__ == "Linear4bit"]
