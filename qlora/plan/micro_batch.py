"""`train.micro_batch_size: auto`: the largest micro-batch the plan fits, confirmed on the GPU.

The plan (qlora.plan.memory) picks it from config.json before anything loads; grad_accum_steps then
keeps the effective batch (sequences per optimizer step) exact, so `auto` changes speed and
memory, never the optimization. On CUDA one dry-run forward+backward at that size measures the
real peak and steps down if the plan was optimistic. On CPU there is no device total to plan
for, so auto needs train.memory_budget (and is not confirmed by a dry run).
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Callable, Optional

from qlora.config import JobConfig
from qlora.errors import ConfigError
from qlora.plan.architecture import load_architecture
from qlora.plan.budget import read_budget
from qlora.plan.memory import CUDA_CONTEXT_BYTES, largest_micro_batch, make_plan
from qlora.plan.settings import PlanSettings, settings_from_job
from qlora.sizes import format_bytes


def resolve_micro_batch(config: JobConfig, echo: Callable[[str], None] = print) -> Optional[int]:
    """Replace micro_batch_size auto by a number (and set grad_accum_steps); returns the memory
    budget when auto was asked for, else None. Loads no weights."""
    train = config.train
    if train.micro_batch_size != "auto":
        return None
    budget = memory_budget(train.memory_budget)
    effective = train.effective_batch_size or train.grad_accum_steps
    arch = load_architecture(config.model.name_or_path, config.model.trust_remote_code)
    settings = launched_settings(config, micro_batch=1)
    largest = largest_micro_batch(arch, settings, budget, limit=effective)
    if largest == 0:
        need = make_plan(arch, settings).total_bytes
        raise ConfigError(
            f"train.micro_batch_size auto: even one sequence of data.max_seq_len {config.data.max_seq_len} needs "
            f"{format_bytes(need)}, over the memory budget {format_bytes(budget)} (see `qlora plan`)"
        )
    set_micro_batch(config, largest, effective)
    echo(
        f"micro_batch_size auto: {train.micro_batch_size} x grad_accum_steps {train.grad_accum_steps} = {effective} "
        f"sequences per step (the plan fits up to {largest} in {format_bytes(budget)})"
    )
    return budget


def launched_settings(config: JobConfig, micro_batch: Optional[int] = None) -> PlanSettings:
    """The plan settings of one GPU of this launch: under torchrun each of WORLD_SIZE ranks holds
    its share of the job (train.distributed), so the budget is compared with one GPU's numbers."""
    settings = settings_from_job(config, micro_batch=micro_batch)
    world_size = os.environ.get("WORLD_SIZE")
    return replace(settings, world_size=int(world_size)) if world_size else settings


def set_micro_batch(config: JobConfig, at_most: int, effective: int) -> None:
    """The largest divisor of the effective batch not above `at_most`, so micro x accum == effective."""
    micro = max(divisor for divisor in range(1, min(at_most, effective) + 1) if effective % divisor == 0)
    config.train.micro_batch_size = micro
    config.train.grad_accum_steps = effective // micro


def memory_budget(text) -> int:
    """train.memory_budget, else the CUDA card's total (qlora.plan.budget); on CPU auto needs
    train.memory_budget (see the module's docstring)."""
    import torch

    if text is not None or torch.cuda.is_available():
        return read_budget(text).bytes
    raise ConfigError(
        "train.micro_batch_size: auto needs a memory budget without a CUDA GPU: "
        "set train.memory_budget (e.g. 16GiB) or a number"
    )


def confirm_micro_batch(
    model, config: JobConfig, budget: int, vocab_size: int, echo: Callable[[str], None] = print
) -> None:
    """CUDA only: one forward+backward at micro_batch x max_seq_len measures the real peak
    (plus the optimizer state and context the plan adds, which do not exist yet); step down
    to a smaller divisor of the effective batch until it fits. RNG state is restored."""
    import torch

    if not torch.cuda.is_available():
        return
    effective = config.train.micro_batch_size * config.train.grad_accum_steps
    extra = CUDA_CONTEXT_BYTES + next(
        line.bytes
        for line in make_plan(load_architecture(config.model.name_or_path), launched_settings(config)).lines
        if line.name == "optimizer_state"
    )
    while True:
        micro = config.train.micro_batch_size
        peak = dry_run_peak(model, micro, config.data.max_seq_len, vocab_size, config.quantization.compute_dtype)
        if peak is not None and peak + extra <= budget:
            echo(
                f"micro_batch_size {micro} confirmed: dry-run peak {format_bytes(peak)} allocated "
                f"(+{format_bytes(extra)} optimizer state and context) of {format_bytes(budget)}"
            )
            return
        if micro == 1:
            raise ConfigError(
                f"train.micro_batch_size auto: one sequence of {config.data.max_seq_len} tokens "
                f"does not fit in {format_bytes(budget)} (dry run); lower data.max_seq_len"
            )
        outcome = "ran out of memory" if peak is None else f"peaked at {format_bytes(peak + extra)}"
        echo(f"micro_batch_size {micro}: dry run {outcome}; trying smaller")
        set_micro_batch(config, micro - 1, effective)


def dry_run_peak(model, micro_batch: int, seq_len: int, vocab_size: int, compute_dtype: str) -> Optional[int]:
    """Peak allocated bytes of one forward+backward on random tokens (None on out-of-memory)."""
    import torch
    import torch.nn.functional as F

    device = torch.device("cuda", torch.cuda.current_device())
    was_training = model.training
    model.train()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    peak = None
    with torch.random.fork_rng(devices=[device]):
        try:
            input_ids = torch.randint(0, vocab_size, (micro_batch, seq_len), device=device)
            with torch.autocast("cuda", dtype=getattr(torch, compute_dtype), enabled=compute_dtype != "float32"):
                logits = model(input_ids=input_ids, use_cache=False).logits
                loss = F.cross_entropy(logits.float().flatten(0, 1), input_ids.flatten(), reduction="sum")
            del logits
            loss.backward()
            peak = torch.cuda.max_memory_allocated()
        except torch.OutOfMemoryError:
            peak = None
        finally:
            loss = None
            model.zero_grad(set_to_none=True)
            model.train(was_training)
            torch.cuda.empty_cache()
    return peak
