"""`train.gradient_checkpointing: auto`: the fastest checkpointing mode the plan fits, chosen
before anything loads.

The candidates are no checkpointing, selective (4-bit bases only: the policy keeps bitsandbytes'
4-bit matmul outputs) and full; "fastest" is the fewest training FLOPs per token by the plan's own
FLOP model (none < selective < full: full recomputes every base matmul, selective only the cheap
rest). The first that fits the memory budget (less HEADROOM) wins; when none does, full, the
smallest, as the old default (true) would have run: auto never refuses a job that `true` accepted.

The budget: train.memory_budget if set, else the CUDA device's total memory, else (CPU) the RAM
available now (MemAvailable), shared by the processes of this host under torchrun.

With train.micro_batch_size auto the mode is chosen first, at micro-batch 1, and the micro-batch
is then the largest that fits in that mode. The order matters, and this is why: recomputation is
a fixed ~1/3 more FLOPs for every token, while a larger micro-batch only changes how many tokens
each kernel sees (and with grad_accum_steps keeping the effective batch, never the optimization);
at realistic sequence lengths one sequence already fills the matmuls, so the mode is the lever
that pays, and the micro-batch takes what memory the mode leaves.

Preference jobs (train.objective dpo / orpo) are planned as they train (launched_settings): a
micro-batch row is a pair of sequences, and DPO's reference forward is a phase of its own (it
adds FLOPs equally to every mode, so the order of the candidates stays).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Callable, Optional, Union

from qlora.config import JobConfig
from qlora.plan.architecture import Architecture, load_architecture
from qlora.plan.budget import MemoryBudget
from qlora.plan.memory import make_plan
from qlora.plan.micro_batch import launched_settings
from qlora.plan.settings import AUTO_WITHOUT_BUDGET, PlanSettings
from qlora.sizes import format_bytes

AUTO = "auto"
# auto wants this share of the budget spare: the plan's logits, backward and allocator lines are
# estimates until bench/plan_proof.py measures them at size, RAM moves under other processes, and
# auto is not confirmed by a dry run, so a mode that fits only to the last byte is not chosen.
HEADROOM = 0.10
MODES: tuple[Union[bool, str], ...] = (False, "selective", True)  # every value auto can resolve to


@dataclass(frozen=True)
class CheckpointingChoice:
    mode: Union[bool, str]
    needs: dict  # the YAML word of each candidate -> its planned total bytes, fastest first
    budget: Optional[MemoryBudget]
    reason: str

    def line(self) -> str:
        return f"gradient_checkpointing auto: {mode_word(self.mode)} ({self.reason})"

    def to_json(self) -> dict:
        budget = asdict(self.budget) if self.budget else None
        return {"mode": self.mode, "needs_bytes": self.needs, "budget": budget, "reason": self.reason}


def mode_word(mode: Union[bool, str]) -> str:
    """The value as the job file writes it."""
    return {True: "true", False: "false"}.get(mode, mode)


def tightest(budgets: list[Optional[MemoryBudget]]) -> Optional[MemoryBudget]:
    """One budget for every rank (all must train the same mode: FSDP's recompute gathers shards in
    backward, so ranks that differ would wait at different collectives): the smallest reading."""
    if any(budget is None for budget in budgets):
        return None
    smallest = min(budgets, key=lambda budget: budget.bytes)
    if len(budgets) == 1:
        return smallest
    return replace(smallest, source=f"{smallest.source}, the smallest of {len(budgets)} ranks'")


def choose_checkpointing(
    arch: Architecture, settings: PlanSettings, budget: Optional[MemoryBudget]
) -> CheckpointingChoice:
    """The fastest candidate whose planned total fits the budget (qlora.plan.memory), with why."""
    candidates = [mode for mode in MODES if mode != "selective" or settings.bits == 4]
    plans = {
        mode: make_plan(arch, replace(settings, gradient_checkpointing=mode), suggest=False) for mode in candidates
    }
    fastest_first = sorted(candidates, key=lambda mode: plans[mode].flops_per_token)  # stable: ties keep MODES' order
    needs = {mode_word(mode): plans[mode].total_bytes for mode in fastest_first}

    def need(mode) -> str:
        return f"{mode_word(mode)} needs {format_bytes(plans[mode].total_bytes)}"

    if budget is None:
        listed = ", ".join(need(mode) for mode in fastest_first)
        reason = f"no memory budget known: planned as the smallest; {listed}"
        return CheckpointingChoice(AUTO_WITHOUT_BUDGET, needs, None, reason)
    usable = int(budget.bytes * (1 - HEADROOM))
    within = f"{format_bytes(usable)} ({1 - HEADROOM:.0%} of {format_bytes(budget.bytes)}, {budget.source})"
    for index, mode in enumerate(fastest_first):
        if plans[mode].total_bytes <= usable:
            faster = [f"{need(other)} > {within}" for other in fastest_first[:index]]
            chosen = f"{need(mode)}, the fastest that fits" + ("" if faster else f" in {within}")
            return CheckpointingChoice(mode, needs, budget, "; ".join(faster + [chosen]))
    smallest = min(fastest_first, key=lambda mode: plans[mode].total_bytes)
    reason = f"nothing fits {within}, even {need(smallest)}: the smallest, as true would run; see `qlora plan`"
    return CheckpointingChoice(smallest, needs, budget, reason)


def resolve_checkpointing(
    config: JobConfig,
    budget: Optional[MemoryBudget],
    echo: Callable[[str], None] = print,
    kept: Optional[Union[bool, str]] = None,
) -> Optional[CheckpointingChoice]:
    """Replace gradient_checkpointing auto by the mode that trains (so the saved config.yaml and the
    run record hold it) and print one line saying why. Planned for one GPU of this launch
    (launched_settings) at train.micro_batch_size, or 1 when that is auto too. `kept`: the mode a
    resumed checkpoint trained with, which wins (its run record must match this run's). Returns
    None when the job names a mode itself. Loads no weights."""
    if config.train.gradient_checkpointing != AUTO:
        return None
    if kept in MODES:
        config.train.gradient_checkpointing = kept
        echo(f"gradient_checkpointing auto: {mode_word(kept)} (the checkpoint's: a resumed run trains as it did)")
        return None
    arch = load_architecture(config.model.name_or_path, config.model.trust_remote_code)
    choice = choose_checkpointing(arch, launched_settings(config), budget)
    config.train.gradient_checkpointing = choice.mode
    echo(choice.line())
    return choice
