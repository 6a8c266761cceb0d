"""`train.micro_batch_size: auto`: the largest micro-batch the plan fits, confirmed on the GPU.

The plan (qlora.plan.memory) picks it from config.json before anything loads; grad_accum_steps then
keeps the effective batch (sequences per optimizer step) exact, so `auto` changes speed and
memory, never the optimization. On CUDA one dry-run training step at that size (the loop's own
loss on a synthetic batch: qlora.training.dry_run, handed in by the job, as this layer sits below
training) measures the real peak and steps down if the plan was optimistic. On CPU there is no
device total to plan for, so auto needs train.memory_budget (and is not confirmed by a dry run).
For train.objective dpo / orpo the micro-batch counts pairs (two sequences each, and DPO's
reference forward: qlora.plan.activations), as the loop's preference batches do, and the dry run
is a preference step.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Callable, Optional

from qlora.config import JobConfig
from qlora.errors import ConfigError
from qlora.plan.architecture import load_architecture
from qlora.plan.budget import read_budget
from qlora.plan.memory import ALLOCATOR_SLACK, CUDA_CONTEXT_BYTES, largest_micro_batch, make_plan
from qlora.plan.settings import OBJECTIVE_PASSES, PlanSettings, settings_from_job
from qlora.sizes import format_bytes

# The dry run reads max_memory_allocated; the card must also hold what the caching allocator
# reserves beyond it (freed blocks kept for reuse, the unused tails of split blocks), which a
# single step from an emptied cache under-shows and later steps, fragmenting, add to. The plan
# charges the same share for the same reason (qlora.plan.memory.ALLOCATOR_SLACK): one number,
# so a size the plan fits is judged by the same rule once measured.
DRY_RUN_SLACK = ALLOCATOR_SLACK


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
            f"train.micro_batch_size auto: even {one_row(config)} of data.max_seq_len {config.data.max_seq_len} "
            f"needs {format_bytes(need)}, over the memory budget {format_bytes(budget)} (see `qlora plan`)"
        )
    set_micro_batch(config, largest, effective)
    echo(
        f"micro_batch_size auto: {train.micro_batch_size} x grad_accum_steps {train.grad_accum_steps} = {effective} "
        f"{rows_word(config)} per step (the plan fits up to {largest} in {format_bytes(budget)})"
    )
    return budget


def rows_word(config: JobConfig) -> str:
    """What micro_batch_size counts: sequences, or pairs of them (train.objective dpo / orpo)."""
    return "sequences" if OBJECTIVE_PASSES[config.train.objective][0] == 1 else "pairs"


def one_row(config: JobConfig) -> str:
    return "one sequence" if rows_word(config) == "sequences" else "one pair (chosen + rejected sequences)"


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
    config: JobConfig,
    budget: int,
    measure_peak: Callable[[int], Optional[int]],
    echo: Callable[[str], None] = print,
) -> None:
    """CUDA only: `measure_peak(micro_batch)` runs one training step at that size and returns the
    allocator's peak (None: out of memory; qlora.training.dry_run); step down until it fits."""
    import torch

    if torch.cuda.is_available():
        step_down_until_fits(config, budget, resident_extra_bytes(config), measure_peak, echo)


def step_down_until_fits(
    config: JobConfig,
    budget: int,
    extra: int,
    measure_peak: Callable[[int], Optional[int]],
    echo: Callable[[str], None] = print,
) -> None:
    """While the measured peak, the allocator slack and `extra` (resident_extra_bytes) exceed the
    budget (dry_run_fits), the next smaller divisor of the effective batch; raises at 1."""
    effective = config.train.micro_batch_size * config.train.grad_accum_steps
    while True:
        micro = config.train.micro_batch_size
        peak = measure_peak(micro)
        if peak is not None and dry_run_fits(peak, extra, budget):
            echo(
                f"micro_batch_size {micro} confirmed: dry-run peak {format_bytes(peak)} allocated "
                f"(+{DRY_RUN_SLACK:.0%} allocator slack, +{format_bytes(extra)} optimizer state and context) "
                f"of {format_bytes(budget)}"
            )
            return
        if micro == 1:
            raise ConfigError(
                f"train.micro_batch_size auto: {one_row(config)} of {config.data.max_seq_len} tokens "
                f"does not fit in {format_bytes(budget)} (dry run); lower data.max_seq_len"
            )
        outcome = "ran out of memory" if peak is None else f"needs {format_bytes(dry_run_need(peak, extra))}"
        echo(f"micro_batch_size {micro}: dry run {outcome}; trying smaller")
        set_micro_batch(config, micro - 1, effective)


def resident_extra_bytes(config: JobConfig) -> int:
    """What the card holds during training that a dry-run step before the optimizer exists does not
    show: the optimizer state (the plan's line, counted even when paged: conservative) and the
    CUDA context outside torch's allocator. The architecture is read as the job reads it
    (model.trust_remote_code included: a custom config class loads only with it)."""
    arch = load_architecture(config.model.name_or_path, config.model.trust_remote_code)
    lines = make_plan(arch, launched_settings(config)).lines
    return CUDA_CONTEXT_BYTES + next(line.bytes for line in lines if line.name == "optimizer_state")


def dry_run_need(peak_allocated: int, extra: int, slack: float = DRY_RUN_SLACK) -> int:
    """Bytes the card must hold for a step whose allocator peak was measured as peak_allocated."""
    return int(peak_allocated * (1 + slack)) + extra


def dry_run_fits(peak_allocated: int, extra: int, budget: int, slack: float = DRY_RUN_SLACK) -> bool:
    """Whether the measured peak, the allocator slack on top of it and `extra` fit in the budget."""
    return dry_run_need(peak_allocated, extra, slack) <= budget
