"""Where a job's model lives: one process, a DDP replica per rank, or FSDP shards across ranks.

    one process   the peft model trains itself
    ddp           every rank loads the base, the loop trains a DistributedDataParallel replica
    fsdp          rank 0 alone reads the checkpoint, the others start empty (qlora.model.sharded_load);
                  the loop trains the FSDP-wrapped model, whose adapter tensors are gathered to save

Under FSDP no rank holds the whole adapter, so saving gathers it first (a collective: every
rank calls `adapter_state`), and a checkpoint's optimizer state is every rank's own shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from qlora.adapters import attach_lora, load_adapter_weights
from qlora.adapters.lora import add_reference_adapter
from qlora.config import JobConfig
from qlora.model.base import load_base, parameter_counts, weight_bytes
from qlora.model.row_attention import batch_layout, chosen_attention
from qlora.sizes import format_bytes
from qlora.training.distributed import World, replicated


@dataclass
class PlacedModel:
    model: object
    """The peft model: what generation uses and, without FSDP, what a checkpoint saves."""
    trained: object
    """What the loop runs: the peft model, its DDP replica, or its FSDP shards."""
    parameters: tuple[int, int]
    """(trainable, total) parameter counts of the whole model."""
    sharded: bool

    def adapter_state(self) -> Optional[dict]:
        """The adapter's whole tensors for saving (None: the peft model saves its own). Under FSDP
        a collective: call it on every rank."""
        if not self.sharded:
            return None
        from qlora.training.fsdp import adapter_state_dict

        return adapter_state_dict(self.trained)


def shards_the_base(config: JobConfig, world: World) -> bool:
    """FSDP when the job asks for it under torchrun (one rank too: the same path on one GPU)."""
    return config.train.distributed == "fsdp" and world.launched


def place_model(
    config: JobConfig,
    world: World,
    echo: Callable[[str], None],
    adapter_from: Optional[Path] = None,
    before_wrap: Optional[Callable] = None,
) -> PlacedModel:
    """The frozen base with LoRA adapters (fresh, model.adapter's, or a checkpoint's `adapter_from`),
    and DPO's model.reference_adapter beside them, placed on this rank. `before_wrap(model)` runs on
    each rank's whole peft model before DDP wraps it (the auto micro-batch's dry run; not under
    FSDP, where only rank 0's model is whole)."""
    sharded = shards_the_base(config, world)
    # The micro-batch is final here but for the auto dry run's step down, which only shrinks it:
    # an attention correct for this many sequences per batch is correct for fewer.
    layout = batch_layout(config.train.micro_batch_size, config.data.packing, config.data.padding_free)
    if sharded:
        from qlora.model.sharded_load import load_sharded_base

        base = load_sharded_base(
            config.model,
            config.quantization,
            gradient_checkpointing=config.train.gradient_checkpointing,
            seed=config.train.seed,
            layout=layout,
        )
    else:
        base = load_base(
            config.model,
            config.quantization,
            gradient_checkpointing=config.train.gradient_checkpointing,
            seed=config.train.seed,
            layout=layout,
        )
    memory = format_bytes(weight_bytes(base))
    echo(f"base: {config.model.name_or_path} ({config.quantization.describe()}), {memory} in memory")
    choice = chosen_attention(base)
    if choice is not None:
        echo(f"attention: {choice.implementation} ({choice.reason})")
    lora = config.lora
    model = attach_lora(base, lora, seed=config.train.seed)
    trainable, total = parameter_counts(model)
    share = f"{100 * trainable / total:.3f}%"
    echo(f"trainable parameters: {trainable:,} of {total:,} ({share}), LoRA r={lora.r} alpha={lora.alpha:g}")
    # A checkpoint of this run holds the adapter as trained so far; model.adapter is where it began.
    starting = adapter_from is None and config.model.adapter is not None
    adapter_from = Path(config.model.adapter) if starting else adapter_from
    if adapter_from is not None and (world.is_main or not sharded):
        # Under FSDP rank 0's weights are the ones sharding sends to every rank; the others are empty.
        load_adapter_weights(model, adapter_from)
        if starting:
            echo(f"adapter: starting from {adapter_from}")
    if config.model.reference_adapter is not None:
        add_reference_adapter(model, config.model.reference_adapter)
        echo(f"dpo reference: the base with {config.model.reference_adapter} (frozen)")
    if before_wrap is not None and not sharded:
        before_wrap(model)
    if sharded:
        from qlora.training.fsdp import shard_model

        trained = shard_model(model)
        echo(f"fsdp: the base and adapters sharded over {world.size} rank(s), {shard_bytes(trained)} on this one")
    else:
        trained = replicated(model, world)
        if world.several:
            echo(f"ddp: a replica on each of {world.size} ranks, gradients averaged every optimizer step")
    return PlacedModel(model=model, trained=trained, parameters=(trainable, total), sharded=sharded)


def shard_bytes(model) -> str:
    return format_bytes(weight_bytes(model))
