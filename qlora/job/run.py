"""`run_job(config)`: the one place that knows the order of a job.

config -> output dir check -> tokenizer + data (all rows validated) -> base + adapters ->
loop -> artifacts. Everything a user can get wrong is checked before the model loads and
before anything is written.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

from qlora.adapters.lora import reference_adapter_active
from qlora.config import JobConfig, dump_config
from qlora.errors import CheckpointError, ConfigError, QloraError
from qlora.job.artifacts import (
    JobResult,
    checkpoint_writer,
    newest_checkpoint,
    publish,
    restore_exact_match,
    run_exact_match,
)
from qlora.job.placement import PlacedModel, place_model
from qlora.job.prepared import PreparedData, batch_maker, epoch_length, prepare_data, total_steps
from qlora.job.resume import check_same_run, find_checkpoint, rewind_metrics, run_record
from qlora.job.start_adapter import check_start_adapters
from qlora.job.tracking import job_trackers
from qlora.model.host_memory import keep_large_blocks_out_of_the_heap
from qlora.output_dir import check_output_dir, claim_output_dir, disk_full_explained, unfinished
from qlora.plan.budget import read_budget
from qlora.plan.checkpointing_mode import AUTO, resolve_checkpointing, tightest
from qlora.plan.mfu import job_flop_meter
from qlora.plan.micro_batch import confirm_micro_batch, resolve_micro_batch, set_micro_batch
from qlora.plan.settings import OBJECTIVE_PASSES
from qlora.training.builders import build_optimizer, build_schedule, loop_settings
from qlora.training.checkpoint import TrainingState, load_training_state, remove_partial_checkpoints, verify_checkpoint
from qlora.training.distributed import World, agreed, from_every_rank, join, leave, world_from_env
from qlora.training.dry_run import cuda_dry_run_peak
from qlora.training.loop import LoopResult, train
from qlora.training.metrics import MetricsLog
from qlora.training.precision import build_precision
from qlora.training.preference import PreferenceObjective
from qlora.training.trackers import Trackers, check_installed


@dataclass
class ResumePoint:
    checkpoint: Path
    state: TrainingState
    run: dict
    """The run record saved with the checkpoint."""


def validate_job(config: JobConfig, echo: Callable[[str], None] = print) -> dict:
    """Everything `train` checks before loading the model, as a report; loads no weights."""
    check_installed(config.train.report_to)
    check_start_adapters(config, echo)
    prepared = prepare_data(config, echo)
    resolve_checkpointing(config, read_budget(config.train.memory_budget) if auto_mode(config) else None, echo)
    resolve_micro_batch(config, echo)
    batches_per_epoch = epoch_length(config, prepared.train.examples)
    steps = total_steps(config, batches_per_epoch)
    echo(f"ok: {batches_per_epoch} micro-batches per epoch, {steps} optimizer steps")
    return {
        "train": prepared.train.stats,
        "eval": prepared.eval.stats if prepared.eval else None,
        "micro_batches_per_epoch": batches_per_epoch,
        "optimizer_steps": steps,
    }


def run_job(
    config: JobConfig,
    *,
    overwrite: bool = False,
    resume_from: Optional[str] = None,
    resume_anyway: bool = False,
    stop_requested: Callable[[], bool] = lambda: False,
    echo: Callable[[str], None] = print,
    world: Optional[World] = None,
) -> Optional[JobResult]:
    """Train the job, resuming from its newest complete checkpoint (or `resume_from`) if any.

    Every check (output dir, checkpoint, data, the checkpoint belonging to this run) happens
    before the model loads and before anything is written. Under torchrun (`world` from the
    environment by default) every rank runs this; rank 0 alone prints, writes and returns the
    result (the others return None), and a check failing on any rank fails on all.
    """
    world = world or world_from_env(config.train.distributed)
    join(world)
    together = False  # every rank reaches the end: a finished run, or an error all ranks raise
    try:
        echo = echo if world.is_main else silent
        # Collectives stay outside `agreed`'s checks: a rank failing before one would leave the
        # others waiting at another, and their exchanges would cross.
        checkpoint, budget = agreed(world, lambda: first_checks(config, overwrite, resume_from))
        seen = from_every_rank(world, (checkpoint.name if checkpoint else None, budget))
        run = agreed(world, lambda: plan_run(config, overwrite, checkpoint, seen, resume_anyway, world, echo))
        output_dir = Path(config.output.dir)
        with contextlib.ExitStack() as claimed:
            # Rank 0 owns the output folder; the others read a checkpoint in it, never write.
            if world.is_main:
                agreed(world, lambda: claimed.enter_context(claim_output_dir(output_dir, wipe=run.resume is None)))
            else:
                agreed(world, lambda: None)
            if run.resume and world.is_main:
                removed = remove_partial_checkpoints(output_dir / "checkpoints")
                run.logged_through = rewind_metrics(output_dir / "metrics.jsonl", run.resume.state.step)
                note = f"; removed {len(removed)} partial checkpoint(s) a killed writer left" if removed else ""
                echo(f"resuming from {run.resume.checkpoint} (step {run.resume.state.step} of {run.max_steps}){note}")
            # The checkpoint and artifact writers name what they were writing; this catches the rest
            # (metrics.jsonl, config.yaml) the same way.
            with disk_full_explained("the run's files", output_dir, last_good=lambda: newest_checkpoint(output_dir)):
                result = train_and_publish(config, run, world, stop_requested, echo)
        together = True
        return result
    except QloraError as error:
        together = getattr(error, "agreed", False)
        raise
    finally:
        leave(world, together)


@dataclass
class RunPlan:
    """What the checks before loading decided: the data, the checkpoint to resume, the steps."""

    prepared: PreparedData
    record: dict
    resume: Optional[ResumePoint]
    max_steps: int
    auto_budget: Optional[int]
    logged_through: int = 0
    """The last step a killed run logged (and sent its trackers) before this resume."""


def first_checks(config: JobConfig, overwrite: bool, resume_from: Optional[str]) -> tuple:
    """(the checkpoint to resume or None, this rank's memory budget for auto or None): the checks
    before the ranks compare what they see; no collective, nothing written."""
    output_dir = Path(config.output.dir)
    if overwrite and resume_from:
        raise ConfigError("--overwrite and --resume-from: choose one (start over, or resume)")
    check_output_dir(output_dir, overwrite)
    check_installed(config.train.report_to)
    checkpoint = None if overwrite else find_checkpoint(output_dir, resume_from)
    # Every rank reads its own: all must train one checkpointing mode, chosen for the tightest.
    budget = read_budget(config.train.memory_budget) if auto_mode(config) else None
    return checkpoint, budget


def plan_run(
    config: JobConfig,
    overwrite: bool,
    checkpoint: Optional[Path],
    seen: list,
    resume_anyway: bool,
    world: World,
    echo,
) -> RunPlan:
    """Every check before the model loads, given what first_checks found on each rank (`seen`: its
    (checkpoint name, budget) by rank); no collective, nothing written."""
    output_dir = Path(config.output.dir)
    names = [name for name, _ in seen]
    if len(set(names)) > 1:
        raise CheckpointError(
            f"{output_dir}: the ranks see different checkpoints ({', '.join(map(str, names))}, by rank); "
            "output.dir must be one folder shared by every node"
        )
    check_start_adapters(config, echo)
    prepared = prepare_data(config, echo)
    resume = None
    if checkpoint:
        verify_checkpoint(checkpoint)
        resume = ResumePoint(checkpoint, *load_training_state(checkpoint))
    saved = resume.run.get("config", {}) if resume else {}
    # A resumed run keeps the mode its checkpoint trained with (auto's pick is in its run record).
    kept = saved.get("train.gradient_checkpointing")
    resolve_checkpointing(config, tightest([reading for _, reading in seen]), echo, kept=kept)
    auto_budget = resolve_micro_batch_per_rank(config, world, echo)
    if resume and auto_budget is not None:
        # The data position counts the checkpoint's micro-batches: keep the size it trained
        # with, whatever auto would pick on this machine now.
        config.train.micro_batch_size = saved.get("train.micro_batch_size", config.train.micro_batch_size)
        config.train.grad_accum_steps = saved.get("train.grad_accum_steps", config.train.grad_accum_steps)
    record = job_record(config, prepared, world)
    if resume:
        check_same_run(checkpoint, resume.run, record, resume_anyway, echo)
    max_steps = total_steps(config, epoch_length(config, prepared.train.examples), world.size)
    if resume and resume.state.step > max_steps:
        raise CheckpointError(f"{checkpoint}: at step {resume.state.step}, past the job's {max_steps} optimizer steps")
    if checkpoint is None and unfinished(output_dir) and not overwrite:
        echo(f"{output_dir} holds an unfinished run with no complete checkpoint: starting over")
    return RunPlan(prepared, record, resume, max_steps, auto_budget)


def preference_objective(config: JobConfig, model, world: World):
    """The loop's dpo / orpo objective. DPO's reference is the same model in a context: the base
    with the adapter switched off (peft's disable_adapter on the peft model, also inside a DDP /
    FSDP wrapper), or with model.reference_adapter in its place; the loop needs no second model
    and imports no adapter library."""
    train = config.train
    reference = None
    if train.objective == "dpo":
        with_reference = config.model.reference_adapter is not None
        reference = (lambda: reference_adapter_active(model)) if with_reference else model.disable_adapter
    return PreferenceObjective(
        train.objective,
        beta=train.dpo_beta,
        label_smoothing=train.dpo_label_smoothing,
        dpo_loss=train.dpo_loss,
        orpo_lambda=train.orpo_lambda,
        reference=reference,
        world=world,
    )


def auto_mode(config: JobConfig) -> bool:
    return config.train.gradient_checkpointing == AUTO


def job_record(config: JobConfig, prepared: PreparedData, world: World) -> dict:
    return run_record(config, prepared.train.examples, prepared.eval.examples if prepared.eval else [], world.size)


def resolve_micro_batch_per_rank(config: JobConfig, world: World, echo) -> Optional[int]:
    """micro_batch_size auto for one rank's share of each step: effective_batch_size (default:
    grad_accum_steps x N, what micro-batch 1 would give) split evenly over the N ranks."""
    train = config.train
    if not world.several or train.micro_batch_size != "auto":
        return resolve_micro_batch(config, echo)
    asked = train.effective_batch_size
    effective = asked or train.grad_accum_steps * world.size
    if effective % world.size:
        raise ConfigError(
            f"train.effective_batch_size: {effective} sequences per step cannot be split evenly over "
            f"{world.size} processes; use a multiple of {world.size}"
        )
    train.effective_batch_size = effective // world.size
    try:
        return resolve_micro_batch(config, echo)
    finally:
        train.effective_batch_size = asked


def silent(line: str) -> None:
    """The echo of ranks other than 0: one copy of every line is enough."""


def train_and_publish(config: JobConfig, run: RunPlan, world: World, stop_requested, echo) -> Optional[JobResult]:
    """Base + adapters (restored from the run's checkpoint if it resumes) -> loop -> artifacts."""
    import torch
    from transformers import set_seed

    set_seed(config.train.seed)
    if not torch.cuda.is_available():
        keep_large_blocks_out_of_the_heap()  # the step's host memory, given back: qlora/model/host_memory.py
    prepared, resume = run.prepared, run.resume
    if run.auto_budget is not None and resume is None:
        # A resumed run keeps the micro-batch its checkpoint was trained with (checked above).
        placed = place_model(
            config, world, echo, before_wrap=lambda model: confirm_on_every_rank(config, run, model, world, echo)
        )
        run.max_steps = total_steps(config, epoch_length(config, prepared.train.examples), world.size)
        run.record = job_record(config, prepared, world)
    else:
        placed = place_model(config, world, echo, adapter_from=resume.checkpoint if resume else None)
    if world.is_main:
        # Only now is the micro-batch final: the saved config is the one that trains.
        (Path(config.output.dir) / "config.yaml").write_text(dump_config(config))

    # Exact match generates on rank 0 alone (its replica is whole; the others wait at the loop's
    # first collective). FSDP shards: no rank holds the whole model to generate with.
    exact_rows = [row for row in prepared.eval_rows if row.format != "text"][: config.train.eval_exact_match]
    if exact_rows and placed.sharded:
        echo("exact match: skipped under fsdp (no rank holds the whole model); run `qlora eval` on the adapter")
    exact_rows = exact_rows if world.is_main and not placed.sharded else []
    if resume:
        exact_before = restore_exact_match(resume.run.get("exact_match_before"))
    else:
        exact_before = run_exact_match(placed.model, prepared.tokenizer, exact_rows, config, echo, "before training")
    if world.several:
        # Dropout draws its own masks on each rank; a resume restores every rank's generators.
        torch.manual_seed(config.train.seed + world.rank)
    run_info = {**run.record, "exact_match_before": asdict(exact_before) if exact_before else None}
    resume_step = resume.state.step if resume else None
    with job_trackers(config, resume_step, run.logged_through, echo, world.is_main) as trackers:
        loop = run_loop(placed, config, prepared, run_info, resume, run.max_steps, stop_requested, world, trackers)
        adapter_state = placed.adapter_state()  # every rank: under FSDP, gathering the adapter is collective
        if not world.is_main:
            return None
        exact_after = run_exact_match(placed.model, prepared.tokenizer, exact_rows, config, echo, "after training")
        data_stats = {"train_data": prepared.train.stats, "eval_data": prepared.eval.stats if prepared.eval else None}
        exact = (exact_before, exact_after)
        result = publish(
            placed.model,
            prepared.tokenizer,
            config,
            data_stats,
            loop,
            placed.parameters,
            exact,
            echo,
            world,
            adapter_state,
        )
        trackers.finish(str(result.adapter_path), {"peak_memory_bytes": loop.peak_memory_bytes, "mfu": loop.mfu})
        return result


def confirm_on_every_rank(config: JobConfig, run: RunPlan, model, world: World, echo) -> None:
    """The auto micro-batch's dry run (CUDA), on each rank's whole model; each may step down
    differently, so all take the smallest. A preference job's step is its objective's (a fresh
    one per try: pairs, and DPO's reference forward)."""
    effective = config.train.micro_batch_size * config.train.grad_accum_steps
    train, data = config.train, config.data
    preference = train.objective != "sft"

    def measure_peak(micro_batch: int):
        return cuda_dry_run_peak(
            model,
            micro_batch,
            data.max_seq_len,
            len(run.prepared.tokenizer),
            compute_dtype=config.quantization.compute_dtype,
            chunk_tokens=train.loss_chunk_tokens,
            padding_free=data.padding_free,
            offload_activations=train.offload_activations,
            # Each rank measures its own step: the objective's readings are never summed across ranks here.
            objective=preference_objective(config, model, World()) if preference else None,
        )

    confirm_micro_batch(config, run.auto_budget, measure_peak, echo)
    set_micro_batch(config, min(from_every_rank(world, config.train.micro_batch_size)), effective)


def run_loop(
    placed: PlacedModel,
    config: JobConfig,
    prepared: PreparedData,
    run: dict,
    resume: Optional[ResumePoint],
    max_steps: int,
    stop_requested: Callable[[], bool],
    world: World,
    trackers: Optional[Trackers] = None,
) -> LoopResult:
    """The loop, handed what the builders make of the config; metrics.jsonl closed on every way out."""
    output_dir = Path(config.output.dir)
    pad_id = prepared.tokenizer.pad_token_id
    epoch_batches = batch_maker(config, prepared.train.examples, pad_id)
    eval_batches = batch_maker(config, prepared.eval.examples, pad_id, shuffle=False)(0) if prepared.eval else []
    trained = placed.trained  # the optimizer takes the parameters DDP / FSDP train
    optimizer = build_optimizer(trained, config.train)
    schedule = build_schedule(optimizer, config.train, max_steps)
    # The device of the weights the loop trains, as the loop takes its own: not whether CUDA exists.
    precision = build_precision(config.quantization.compute_dtype, optimizer.param_groups[0]["params"][0].device.type)
    metrics = MetricsLog(output_dir / "metrics.jsonl", trackers) if world.is_main else None
    try:
        objective = preference_objective(config, placed.model, world) if config.train.objective != "sft" else None
        model_source = config.model
        meter = job_flop_meter(
            model_source.name_or_path,
            placed.parameters[0],
            config.quantization.compute_dtype,
            model_source.trust_remote_code,
            reference_forward=OBJECTIVE_PASSES[config.train.objective][1],
            head_positions=objective.head_positions if objective else None,
        )
        return train(
            trained,
            optimizer,
            schedule,
            loop_settings(config.train, max_steps),
            epoch_batches,
            eval_batches,
            precision=precision,
            metrics=metrics,
            save_checkpoint=checkpoint_writer(
                placed.model, output_dir, config.train.keep_checkpoints, run, world, placed.adapter_state
            ),
            resume=resume.state if resume else None,
            stop_requested=stop_requested,
            flop_meter=meter,
            world=world,
            objective=objective,
        )
    finally:
        if metrics:
            metrics.close()
