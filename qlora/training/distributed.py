"""Several processes: who this one is, the process group, and the few collectives a job needs.

torchrun / `accelerate launch` start N copies of the same command and tell each its place
through the environment (RANK, WORLD_SIZE, LOCAL_RANK); torch.distributed is the engine (gloo
on CPU, NCCL on CUDA), we never write our own. One process is the World() default: every
function here is then a no-op or the identity, so single-process runs take no other path.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Optional, Sequence, TypeVar

from qlora.errors import QloraError

Result = TypeVar("Result")
# Long enough for rank 0 alone to generate exact-match answers or write a large checkpoint
# while the others wait at the next collective.
COLLECTIVE_TIMEOUT = timedelta(minutes=60)
# How long a rank leaving waits for the others at the last barrier (see leave).
LEAVE_TIMEOUT = timedelta(seconds=60)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    strategy: str = "ddp"  # how a model is spread over the ranks: ddp (replicas) or fsdp (shards)
    launched: bool = False  # started by torchrun / accelerate launch (a process group, even of one)

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes and prints."""
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.size > 1


def world_from_env(strategy: str = "ddp", environ: Optional[dict] = None) -> World:
    """The World torchrun / accelerate launch describe in the environment (one process without them)."""
    environ = os.environ if environ is None else environ
    try:
        size = int(environ.get("WORLD_SIZE", "1"))
        rank = int(environ.get("RANK", "0"))
        local_rank = int(environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise QloraError(
            f"WORLD_SIZE / RANK / LOCAL_RANK must be integers (got {environ.get('WORLD_SIZE')!r}, "
            f"{environ.get('RANK')!r}, {environ.get('LOCAL_RANK')!r}); start several processes with torchrun"
        ) from None
    if size < 1 or not 0 <= rank < size:
        raise QloraError(f"RANK {rank} is outside WORLD_SIZE {size}; start several processes with torchrun")
    launched = "WORLD_SIZE" in environ
    # One process started without torchrun has nothing to shard over: it trains the model itself.
    return World(rank, size, local_rank, strategy if launched else "ddp", launched)


def join(world: World) -> None:
    """Join the process group torchrun set up (NCCL on CUDA, each rank on its LOCAL_RANK's GPU; gloo on CPU)."""
    if not world.launched:
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=COLLECTIVE_TIMEOUT)


def leave(world: World, together: bool = False) -> None:
    """Leave the process group. `together`: every rank is known to be here (a normal end, or an
    error all ranks agreed on), so they first meet at a barrier: no rank tears its connections
    down while a peer's last collective still uses them (a gloo rank destroyed mid-exchange
    aborts with "terminate called without an active exception" instead of exiting with its code)."""
    if not world.launched:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    if together and world.several:
        try:
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=LEAVE_TIMEOUT)  # a rank that died is reported, not waited for
            else:
                dist.barrier()
        except RuntimeError:
            pass  # a peer is gone: leave anyway
    dist.destroy_process_group()


def collective_device():
    import torch

    # NCCL reduces CUDA tensors only; gloo reduces CPU tensors.
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def summed(world: World, values: Sequence[float]) -> list[float]:
    """Each value summed over the ranks, in one all-reduce (float64: token counts stay exact)."""
    if not world.several:
        return list(values)
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(list(values), dtype=torch.float64, device=collective_device())
    dist.all_reduce(tensor)
    return tensor.tolist()


def any_rank(world: World, flag: bool) -> bool:
    """True on every rank when it is true on any: all ranks take the same branch."""
    return summed(world, [1.0 if flag else 0.0])[0] > 0 if world.several else flag


def from_every_rank(world: World, value: Any) -> list:
    """[rank 0's value, rank 1's, ...] on every rank (small picklable values: RNG states, errors)."""
    if not world.several:
        return [value]
    import torch.distributed as dist

    gathered: list = [None] * world.size
    dist.all_gather_object(gathered, value)
    return gathered


def barrier(world: World) -> None:
    if world.several:
        import torch.distributed as dist

        dist.barrier()


def agreed(world: World, action: Callable[[], Result]) -> Result:
    """Run `action` on every rank; if it fails on any, fail on all with the lowest failing rank's
    error, marked `agreed` (rank 0 prints it, the others stay silent), so one bad input never
    leaves the other ranks waiting at a collective. `action` itself must call no collective: a
    rank failing before it would meet the others' at this one, and the exchanges would cross."""
    try:
        result, failure = action(), None
    except QloraError as error:
        result, failure = None, error
    if not world.several:
        if failure is not None:
            raise failure
        return result
    failures = from_every_rank(world, None if failure is None else (type(failure), str(failure)))
    for rank, failed in enumerate(failures):
        if failed is not None:
            kind, message = failed
            error = failure if rank == world.rank else kind(message if rank == 0 else f"rank {rank}: {message}")
            error.agreed = True
            raise error
    return result


def on_every_rank(world: World, error: QloraError) -> QloraError:
    """Mark an error every rank raises at the same point (a stop, a NaN loss of the reduced step):
    rank 0 alone prints it."""
    error.agreed = world.several
    return error


def prints(world: World, error: Optional[BaseException] = None) -> bool:
    """Whether this rank prints: rank 0 always; the others only errors of their own."""
    return world.is_main or (error is not None and not getattr(error, "agreed", False))


def of_every_rank(world: World, state: dict) -> dict:
    """What a checkpoint keeps of a per-rank state (the generators; FSDP's optimizer shards):
    this process's, or every rank's under torchrun, tensors moved to the CPU."""
    return state if not world.several else {"ranks": from_every_rank(world, on_cpu(state))}


def this_ranks(world: World, saved: dict) -> dict:
    """This rank's state from a checkpoint's; a run resumed on more ranks than it saved
    (--resume-anyway; DDP only) reuses them round-robin."""
    if not isinstance(saved, dict) or "ranks" not in saved:
        return saved
    return saved["ranks"][world.rank % len(saved["ranks"])]


def on_cpu(value: Any) -> Any:
    """A state tree with its tensors copied to the CPU: pickled CUDA tensors would unpickle on the
    sending rank's GPU."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: on_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(on_cpu(item) for item in value)
    return value


def share(world: World, items: Sequence, per_rank: int) -> list[tuple[Any, bool]]:
    """This rank's consecutive items of a window, as (item, counted) pairs: `per_rank` of a whole
    window (world.size * per_rank items), an even split of a short one (an epoch's last), padded
    with uncounted repeats of the window's first item so every rank runs as many forward and
    backward passes as the others (DDP's all-reduce and FSDP's gathers must meet)."""
    whole = len(items) == world.size * per_rank
    per = per_rank if whole else math.ceil(len(items) / world.size)
    mine = [(item, True) for item in items[world.rank * per : (world.rank + 1) * per]]
    return mine + [(items[0], False)] * (per - len(mine))


def replicated(model, world: World):
    """DDP: a replica per rank, the trainable gradients all-reduced (averaged) in backward.

    The frozen base is the same on every rank by construction (the same file, the same seed),
    so only the trainable weights are broadcast from rank 0, not gigabytes of 4-bit weights.
    """
    if not world.several:
        return model
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    for parameter in model.parameters():
        if parameter.requires_grad:
            dist.broadcast(parameter.data, src=0)
    return DistributedDataParallel(
        model,
        device_ids=[world.local_rank] if torch.cuda.is_available() else None,
        init_sync=False,
        broadcast_buffers=False,  # rotary tables and the like: constants, equal on every rank
    )
