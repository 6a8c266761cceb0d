"""FSDP-QLoRA: the frozen 4-bit base and its LoRA weights sharded across the ranks.

    base = load_sharded_base(...)                 # qlora.model.sharded_load: rank 0 reads, others are meta
    model = shard_model(attach_lora(base, ...))   # every rank keeps 1/N of each unit
    optimizer = build_optimizer(model, train)     # after wrapping: it must hold the parameters FSDP trains
    ...
    model.clip_grad_norm_(max_norm)               # FSDP's own norm over the ranks' shards (loop: clipped_gradients)
    state = adapter_state_dict(model)             # every rank; small: LoRA weights only
    if rank == 0: save_adapter(peft_model_of(model), directory, state_dict=state)
    load_adapter_weights(model, directory)        # resume: every rank, into its shards

FSDP1 (FullyShardedDataParallel), not FSDP2's fully_shard: fully_shard re-creates parameters as
DTensors and drops a Params4bit's quantization state (bitsandbytes #1945). The wrapping follows
peft's `fsdp_auto_wrap_policy` (the one accelerate uses): each decoder layer (the model's
`_no_split_modules`) is a unit, and every LoRA linear is a unit of its own (a frozen one too:
`wrap_policy`). FSDP flattens a unit's tensors into one tensor of one dtype and one
requires_grad: the decoder layer holds the frozen 4-bit bytes (stored as the compute dtype) and
norms, the LoRA units the float32 adapter weights, so bf16 compute keeps float32 adapters.

`use_orig_params=True`: the model keeps its own parameters (views into the shards) under their
own names, so the optimizer builder's `requires_grad` filter, peft's state-dict helpers and
loss.py's output head all see the LoRA and head tensors they know, not FSDP's flat parameters.

Gradients: FSDP averages them over the ranks, so a rank's loss is scaled by
world_size / (supervised tokens of the whole step, all ranks), and the average is the sum.
"""

from __future__ import annotations

import contextlib

import torch
from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

WRAPPED = "_fsdp_wrapped_module."


def shard_model(peft_model: torch.nn.Module, device=None) -> FullyShardedDataParallel:
    """The peft model wrapped for FSDP on `device` (default: the current GPU, or the CPU).

    Call on every rank at once. Rank 0's weights are the real ones: `sync_module_states`
    broadcasts each unit's parameters and buffers, and the other ranks' meta skeleton
    (qlora.model.sharded_load) is materialized one unit at a time, so no rank holds a whole copy.
    """
    device = torch.device(device) if device is not None else compute_device()
    with cpu_state_sync(device):
        return FullyShardedDataParallel(
            peft_model,
            auto_wrap_policy=wrap_policy(peft_model),
            sharding_strategy=ShardingStrategy.FULL_SHARD,
            use_orig_params=True,
            sync_module_states=True,
            param_init_fn=empty_materializer(device),
            device_id=device,  # on the CPU too: FSDP refuses CPU-only modules without it
            limit_all_gathers=True,
        )


def wrap_policy(peft_model: torch.nn.Module):
    """peft's fsdp_auto_wrap_policy (each decoder layer a unit, each trainable LoRA linear one),
    and every frozen LoRA linear a unit too: a second adapter held frozen beside the trained one
    (DPO's model.reference_adapter) has float32 weights that cannot share a flat tensor with its
    layer's bf16 base."""
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    peft_policy = fsdp_auto_wrap_policy(peft_model)
    lora_linears = {
        id(module)
        for name, module in peft_model.named_modules()
        if not list(module.children())
        and getattr(module, "weight", None) is not None
        and any(part.startswith("lora_") for part in name.split("."))
    }

    def policy(module: torch.nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        return peft_policy(module=module, recurse=recurse, nonwrapped_numel=nonwrapped_numel) or (
            lambda_auto_wrap_policy(module, recurse, nonwrapped_numel, lambda_fn=lambda m: id(m) in lora_linears)
        )

    return policy


@contextlib.contextmanager
def cpu_state_sync(device: torch.device):
    """On the CPU (gloo), let sync_module_states broadcast CPU tensors while wrapping.

    FSDP1 refuses CPU parameters with sync_module_states because NCCL cannot broadcast them;
    gloo can, and our CPU tests must run the same loading path a GPU run takes (rank 0's weights
    broadcast unit by unit). Only that one check is lifted, only during wrapping, only on a CPU.
    """
    from torch.distributed.fsdp import _init_utils

    if device.type != "cpu":
        yield
        return
    check = _init_utils._check_module_states_for_sync_module_states
    _init_utils._check_module_states_for_sync_module_states = lambda module_states: None
    try:
        yield
    finally:
        _init_utils._check_module_states_for_sync_module_states = check


def empty_materializer(device: torch.device):
    """FSDP's param_init_fn: a module's meta parameters and buffers made real (uninitialized;
    sync_module_states overwrites them). Unlike Module.to_empty it keeps a tied weight one tensor
    (a tied head and embedding are one parameter on rank 0, so FSDP's flat sizes agree) and keeps
    a 4-bit weight a Params4bit with its quantization state."""
    made: dict[int, torch.nn.Parameter] = {}

    def materialize(module: torch.nn.Module) -> None:
        for name, parameter in list(module.named_parameters(recurse=False)):
            if parameter.is_meta:
                if id(parameter) not in made:
                    made[id(parameter)] = empty_like_parameter(parameter, device)
                module._parameters[name] = made[id(parameter)]
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.is_meta:
                module._buffers[name] = torch.empty_like(buffer, device=device)

    return materialize


def empty_like_parameter(parameter: torch.nn.Parameter, device: torch.device) -> torch.nn.Parameter:
    empty = torch.empty_like(parameter, device=device)
    if parameter.__class__.__name__ != "Params4bit":
        return torch.nn.Parameter(empty, requires_grad=parameter.requires_grad)
    return type(parameter)(
        empty,
        requires_grad=False,
        quant_state=parameter.quant_state,
        blocksize=parameter.blocksize,
        compress_statistics=parameter.compress_statistics,
        quant_type=parameter.quant_type,
        quant_storage=parameter.quant_storage,
        module=parameter.module,
        bnb_quantized=True,
    )


def peft_model_of(model: torch.nn.Module) -> torch.nn.Module:
    """The peft model inside the FSDP wrapper (its config, adapter names, save_pretrained)."""
    return model.module if isinstance(model, FullyShardedDataParallel) else model


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FullyShardedDataParallel)


def full_adapter_state(model: FullyShardedDataParallel) -> dict[str, torch.Tensor]:
    """Every trainable tensor, whole, on the CPU, under the names of the peft model's own
    state_dict (`...q_proj.lora_A.default.weight`): what peft's save_pretrained(state_dict=...)
    and get_peft_model_state_dict(state_dict=...) take. Gathers one unit at a time and only the
    units holding trainable weights (never the 4-bit base). Call on every rank at once."""
    state = {}
    for prefix, unit, own in trainable_units(model):
        with FullyShardedDataParallel.summon_full_params(unit, recurse=False, writeback=False):
            for name, parameter in own():
                state[clean_name(prefix + name)] = parameter.detach().to("cpu", copy=True)
    return state


def load_full_adapter_state(model: FullyShardedDataParallel, state: dict[str, torch.Tensor]) -> None:
    """Write whole tensors (full_adapter_state's names) into every rank's shards of the trainable
    weights; a name missing from `state` raises KeyError. Call on every rank at once."""
    for prefix, unit, own in trainable_units(model):
        with FullyShardedDataParallel.summon_full_params(unit, recurse=False, writeback=True):
            with torch.no_grad():
                for name, parameter in own():
                    parameter.copy_(state[clean_name(prefix + name)])


def adapter_state_dict(model: FullyShardedDataParallel) -> dict[str, torch.Tensor]:
    """The active adapter's whole tensors under the names peft's files use (adapter name dropped:
    `...q_proj.lora_A.weight`), as peft's get_peft_model_state_dict gives them for one process.
    Call on every rank at once."""
    adapter = peft_model_of(model).active_adapter
    return {file_key(name, adapter): tensor for name, tensor in full_adapter_state(model).items()}


def load_adapter_state_dict(model: FullyShardedDataParallel, state: dict[str, torch.Tensor]) -> None:
    """adapter_state_dict's inverse: file-named whole tensors into every rank's shards."""
    adapter = peft_model_of(model).active_adapter
    names = {file_key(name, adapter): name for name in full_adapter_state(model)}
    load_full_adapter_state(model, {names[key]: tensor for key, tensor in state.items()})


def file_key(name: str, adapter: str) -> str:
    """peft's file key of a state-dict name: `x.lora_A.default.weight` -> `x.lora_A.weight`
    (the adapter name as the last or second-to-last part, never a module named like it)."""
    parts = name.split(".")
    for index in (-2, -1):
        if len(parts) >= -index and parts[index] == adapter:
            del parts[index]
            break
    return ".".join(parts)


def trainable_units(model: FullyShardedDataParallel):
    """(name prefix, FSDP unit, its own trainable parameters) of each unit that has some; a
    unit's own parameters are those no nested unit holds (summon_full_params(recurse=False)
    gathers those alone)."""
    for prefix, unit in model.named_modules():
        if not isinstance(unit, FullyShardedDataParallel):
            continue
        nested = {
            id(parameter)
            for inner in unit.modules()
            if inner is not unit and isinstance(inner, FullyShardedDataParallel)
            for parameter in inner.parameters()
        }

        def own(unit=unit, nested=nested):
            # FSDP's named_parameters gives the names without its wrapper's prefix.
            return [(n, p) for n, p in unit.named_parameters() if p.requires_grad and id(p) not in nested]

        if own():
            yield (prefix + "." if prefix else ""), unit, own


def clean_name(name: str) -> str:
    return name.replace(WRAPPED, "")


def compute_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
