"""Activation offload: where the tensors autograd saves for backward wait between forward and
backward (train.offload_activations)."""

from __future__ import annotations

import contextlib

import torch


def saved_for_backward_on_host(offload: bool):
    """Where the tensors autograd saves for backward wait between forward and backward: on the
    device, or (offload) copied to host memory, pinned on CUDA, and back when backward needs them.

    With non-reentrant gradient checkpointing a checkpointed layer saves only its inputs (through
    this hook; inside the layer torch's own checkpoint hook takes precedence and keeps nothing), so
    offload then moves one hidden state per layer plus what the head and loss save; the layer's
    activations recomputed in backward live on the device only while that layer's backward runs.
    On a CPU both places are host memory: nothing moves. Weights (parameters and views of them,
    as a linear saves its weight for the input's gradient) stay where they are: they live on the
    device for the whole run anyway, and torch's save_on_cpu would copy the frozen head (hundreds
    of MB) to the host and back every micro-batch.
    """
    if not offload:
        return contextlib.nullcontext()
    pin = torch.cuda.is_available()

    def pack(tensor: torch.Tensor):
        if tensor.device.type == "cpu" or is_weight(tensor):
            return tensor
        host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=pin)
        host.copy_(tensor)
        return tensor.device, host

    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        return host.to(device, non_blocking=pin)

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def is_weight(tensor: torch.Tensor) -> bool:
    """A parameter, or a view of one (a transposed weight)."""
    return isinstance(tensor, torch.nn.Parameter) or isinstance(tensor._base, torch.nn.Parameter)
