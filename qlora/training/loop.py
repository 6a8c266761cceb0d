"""The training loop: one screenful, top to bottom.

It receives built objects (a model with trainable adapters, its optimizer and schedule, the
precision, a function giving each epoch's micro-batches, eval batches; qlora.training.builders
makes them from the config) and knows nothing of configs, files or where the model came from,
so it runs on any tiny torch model. A batch is anything with `input_ids`,
`position_ids`, `targets` (next-token ids, -100 where unsupervised), `attention_mask` (or None)
and `supervised_tokens`. A step minimizes the `objective` (SFT's cross-entropy by default;
qlora.training.preference: DPO, ORPO), whose readings (rewards ...) are logged with the loss.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from qlora.errors import Interrupted, TrainingError
from qlora.plan.flops import FlopMeter, mfu
from qlora.training.checkpoint import TrainingState, capture_rng, load_optimizer_state, restore_rng
from qlora.training.distributed import (
    World,
    any_rank,
    of_every_rank,
    on_every_rank,
    share,
    summed,
    this_ranks,
)
from qlora.training.loss import TokenObjective, summed_cross_entropy
from qlora.training.metrics import MetricsLog, peak_memory, progress_bar, reset_peak_memory
from qlora.training.offload import saved_for_backward_on_host
from qlora.training.precision import Precision


@dataclass(frozen=True)
class LoopSettings:
    """The loop's own numbers; built from the train section by qlora.training.builders, which
    holds no defaults either: they live in the schema alone."""

    max_steps: int
    grad_accum_steps: int
    max_grad_norm: Optional[float]  # None: no clipping
    eval_every: Optional[int]
    save_every: Optional[int]
    log_every: int
    offload_activations: bool  # tensors saved for backward wait in host memory
    loss_chunk_tokens: Union[int, str]  # supervised positions per loss chunk (qlora.training.loss)


@dataclass
class LoopResult:
    steps: int
    supervised_tokens: int
    tokens: int
    seconds: float
    final_loss: float
    eval_loss: Optional[float]
    eval_loss_before: Optional[float]
    peak_memory_kind: str
    peak_memory_bytes: int
    readings: Optional[dict] = None  # the objective's last step's extra metrics (and eval_ ones)
    useful_flops: float = 0.0  # of this process's steps (a resumed run counts from its resume)
    mfu: Optional[float] = None  # useful FLOPs / s over peak_flops_per_s (qlora.plan.flops)
    peak_flops_per_s: Optional[float] = None

    @property
    def tokens_per_s(self) -> float:
        return self.supervised_tokens / self.seconds if self.seconds else 0.0


def train(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    settings: LoopSettings,
    epoch_batches: Callable[[int], Sequence],
    eval_batches: Sequence = (),
    *,
    precision: Optional[Precision] = None,
    metrics: Optional[MetricsLog] = None,
    save_checkpoint: Optional[Callable[[TrainingState], Path]] = None,
    resume: Optional[TrainingState] = None,
    stop_requested: Callable[[], bool] = lambda: False,
    flop_meter: Optional[FlopMeter] = None,
    world: World = World(),
    objective=None,
) -> LoopResult:
    """Run optimizer steps from `resume` (or the start) to settings.max_steps.

    The optimizer holds the trainable parameters; `precision` (qlora.training.precision) says
    what the forward autocasts to and scales the loss for float16; none: the model's own dtypes.
    `save_checkpoint(state)` is called every settings.save_every steps and when
    `stop_requested()` turns true (checked before each step); then the loop raises Interrupted.
    With a `flop_meter`, each metrics row and the result carry `mfu`.

    Under torchrun (`world` of N ranks; qlora.training.distributed) every rank reads the same
    micro-batch stream, an optimizer step takes grad_accum_steps x N of them and each rank trains
    its own consecutive grad_accum_steps: the same rows per step as one process accumulating
    grad_accum_steps x N. The model is then DDP- or FSDP-wrapped: its backward averages the
    ranks' gradients. Only rank 0 should be given `metrics`; `save_checkpoint` is called on
    every rank (gathering a checkpoint is collective) and writes on rank 0.
    """
    if world.several and not hasattr(model, "no_sync"):
        raise TrainingError("several processes need the model wrapped (qlora.training.distributed.replicated)")
    parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    device = parameters[0].device
    precision = precision or Precision.none(device.type)
    objective = objective or TokenObjective(summed_loss)
    scaler = precision.scaler
    state = resume or TrainingState()
    if resume:
        load_optimizer_state(optimizer, this_ranks(world, resume.optimizer))  # paged state stays paged
        schedule.load_state_dict(resume.scheduler)
        if resume.grad_scaler:
            scaler.load_state_dict(resume.grad_scaler)
    micro_batches = data_stream(epoch_batches, state.epoch, state.batch_index)
    position = (state.epoch, state.batch_index)
    model.train()
    reset_peak_memory()

    # The untrained baseline, so every run shows how far the adapter moved the eval loss.
    eval_loss, eval_loss_before = nan_if_none(state.eval_loss), nan_if_none(state.eval_loss_before)
    if eval_batches and not resume:
        eval_loss = eval_loss_before = evaluate(
            model, eval_batches, device, settings.loss_chunk_tokens, precision, world, objective
        )
        eval_readings = {f"eval_{name}": value for name, value in objective.readings().items()}  # every rank
        if metrics:
            metrics.write({"step": 0, **eval_row(eval_loss, objective), **eval_readings})
    if resume:
        # Last, after anything above that might draw random numbers: dropout masks from here
        # on are the ones the uninterrupted run drew.
        restore_rng(this_ranks(world, resume.rng))

    def snapshot(step: int) -> TrainingState:
        return TrainingState(
            step=step,
            epoch=position[0],
            batch_index=position[1],
            supervised_tokens=total_supervised,
            tokens=total_tokens,
            elapsed_s=time.perf_counter() - started,
            loss=none_if_nan(loss),
            eval_loss=none_if_nan(eval_loss),
            eval_loss_before=none_if_nan(eval_loss_before),
            # FSDP: each rank's optimizer holds its own shard's state; DDP's replicas hold rank 0's.
            optimizer=of_every_rank(world, optimizer.state_dict())
            if world.strategy == "fsdp"
            else optimizer.state_dict(),
            scheduler=schedule.state_dict(),
            grad_scaler=scaler.state_dict() if scaler.is_enabled() else None,
            rng=of_every_rank(world, capture_rng()),
        )

    started = time.perf_counter() - state.elapsed_s
    total_supervised, total_tokens = state.supervised_tokens, state.tokens
    saved_step, saved_path = state.step, None
    readings = None  # the objective's extra metrics of the last step (DPO/ORPO: rewards/...; SFT: none)
    loss = nan_if_none(state.loss)
    # MFU over this process's steps only: the FLOPs before a resume are not in the checkpoint.
    useful_flops, flops_started = 0.0, time.perf_counter()
    # The with-block closes the bar on every way out (a stop, a NaN), so the last line is ours.
    with progress_bar(settings.max_steps, "training", initial=state.step, disable=not world.is_main) as bar:
        for step in range(state.step + 1, settings.max_steps + 1):
            # Stop only between optimizer steps: a checkpoint never holds half an accumulation window.
            # A signal may reach one rank only: all stop after the same step, or the rest would hang.
            if any_rank(world, stop_requested()):
                if step - 1 > saved_step and save_checkpoint:
                    saved_path, saved_step = save_checkpoint(snapshot(step - 1)), step - 1
                raise on_every_rank(
                    world, Interrupted(stop_message(step - 1, settings.max_steps, saved_step, saved_path))
                )

            # Normalize by the supervised tokens of the WHOLE accumulation window, on every rank,
            # so a token weighs the same whichever micro-batch and rank it landed in (per-micro-batch
            # or per-rank means do not). Every rank holds the whole window, so the count needs no
            # all-reduce; x N because DDP and FSDP average the ranks' gradients.
            # An epoch's last window is short, as Trainer's is: `epochs: 1` trains every row once
            # and none of the next epoch's order.
            window, epoch_ends = [], False
            while len(window) < settings.grad_accum_steps * world.size and not epoch_ends:
                epoch, next_index, batch, epoch_ends = next(micro_batches)
                window.append(batch)
                position = (epoch, next_index)
            window_supervised = sum(batch.supervised_tokens for batch in window)
            window_units = objective.start_window(window)  # SFT: the supervised tokens; DPO/ORPO: the pairs
            mine = share(world, window, settings.grad_accum_steps)
            loss_sum = torch.zeros((), device=device)
            for index, (batch, counted) in enumerate(mine):
                # DDP: gradients cross the ranks once per step, after the window's last micro-batch.
                # FSDP reduce-scatters every micro-batch's: no rank ever holds whole gradients.
                with gradients_kept_local(model, index < len(mine) - 1 and world.strategy != "fsdp"):
                    with saved_for_backward_on_host(settings.offload_activations):
                        with precision.autocast():
                            batch_loss_sum = objective.loss_sum(
                                model, batch, device, settings.loss_chunk_tokens, counted=counted
                            )
                        if not counted:  # a short window's filler: its passes only keep the ranks in step
                            batch_loss_sum = batch_loss_sum * 0
                        scaler.scale(batch_loss_sum * world.size / max(window_units, 1)).backward()
                loss_sum += batch_loss_sum.detach()
                useful_flops += flop_meter.of_batch(batch) if flop_meter and counted else 0.0
            total_tokens += sum(batch.input_ids.numel() for batch in window)
            lr = schedule.get_last_lr()[0]  # the rate this step uses; after schedule.step() it is the next one's
            grad_norm = None
            if settings.max_grad_norm:
                scaler.unscale_(optimizer)  # clip the true gradients, not float16's scaled ones
                grad_norm = clipped_gradients(model, parameters, settings.max_grad_norm)
            scaler.step(optimizer)  # skips the step when float16 gradients overflowed
            scaler.update()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)

            # One host sync per optimizer step (not per micro-batch), loss and grad norm in one
            # transfer: needed to stop on NaN. A non-finite loss raises before any checkpoint of
            # this step: the last one stays good.
            readings = [loss_sum] + (
                [torch.as_tensor(grad_norm, device=loss_sum.device).float()] if grad_norm is not None else []
            )
            loss_total, *norm = torch.stack(readings).tolist()
            loss_total = summed(world, [loss_total])[0]  # every rank's share of the window
            grad_norm = norm[0] if norm else math.nan
            loss = loss_total / max(window_units, 1)
            if not math.isfinite(loss):
                message = f"step {step}: loss is {loss}; lower train.learning_rate or check the data"
                raise on_every_rank(world, TrainingError(message))
            total_supervised += window_supervised
            elapsed = time.perf_counter() - started
            row = {
                "step": step,
                "loss": loss,
                "lr": lr,
                "grad_norm": none_if_nan(grad_norm),
                "supervised_tokens": window_supervised,
                "tokens_per_s": total_supervised / elapsed,
                "elapsed_s": elapsed,
            }
            readings = objective.readings()
            row.update(readings)
            if flop_meter:
                row["mfu"] = mfu(useful_flops, time.perf_counter() - flops_started, flop_meter.peak_flops_per_s)
            last_step = step == settings.max_steps
            if eval_batches and ((settings.eval_every and step % settings.eval_every == 0) or last_step):
                eval_loss = evaluate(
                    model, eval_batches, device, settings.loss_chunk_tokens, precision, world, objective
                )
                row.update(eval_row(eval_loss, objective))
                readings.update({f"eval_{name}": value for name, value in objective.readings().items()})
                row.update(readings)
            if metrics:
                metrics.write(row)
            if save_checkpoint and settings.save_every and step % settings.save_every == 0:
                saved_path, saved_step = save_checkpoint(snapshot(step)), step
            if step % settings.log_every == 0 or last_step:
                shown = {"loss": f"{loss:.4f}"}
                if math.isfinite(eval_loss):  # no eval yet (or no eval data): nothing, not "nan"
                    shown["eval"] = f"{eval_loss:.4f}"
                bar.set_postfix(**shown, tok_s=f"{row['tokens_per_s']:.0f}", refresh=False)
            bar.update(1)

    kind, peak = peak_memory()
    return LoopResult(
        steps=settings.max_steps,
        supervised_tokens=total_supervised,
        tokens=total_tokens,
        seconds=time.perf_counter() - started,
        final_loss=loss,
        readings=readings,
        eval_loss=none_if_nan(eval_loss),
        eval_loss_before=none_if_nan(eval_loss_before),
        peak_memory_kind=kind,
        peak_memory_bytes=peak,
        useful_flops=useful_flops,
        mfu=mfu(useful_flops, time.perf_counter() - flops_started, flop_meter.peak_flops_per_s) if flop_meter else None,
        peak_flops_per_s=flop_meter.peak_flops_per_s if flop_meter else None,
    )


def eval_row(eval_loss: float, objective) -> dict:
    if objective.per_token:
        return {"eval_loss": eval_loss, "eval_perplexity": safe_exp(eval_loss)}
    return {"eval_loss": eval_loss}


def stop_message(done: int, max_steps: int, saved_step: int, saved_path: Optional[Path]) -> str:
    where = f"after step {done} of {max_steps}"
    if saved_path is not None:
        return f"stopped on request {where}; checkpoint {saved_path}; rerun the same command to resume"
    if saved_step:
        return (
            f"stopped on request {where}; nothing new since the step-{saved_step} checkpoint; "
            "rerun the same command to resume"
        )
    return f"stopped on request {where}; nothing trained yet; rerun the same command to start"


def summed_loss(model: torch.nn.Module, batch, device, chunk_tokens: Union[int, str] = "auto") -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropy over the batch's supervised targets.

    Logits exist only for supervised positions, and (qlora.training.loss) for `chunk_tokens` of them at
    a time, recomputed in backward: the vocabulary-sized tensors stay one chunk's size however
    long the completions. Models whose forward post-processes the head's logits (a softcap)
    get their own logits at every supervised position at once.
    """
    return summed_cross_entropy(model, batch, device, chunk_tokens)


def gradients_kept_local(model: torch.nn.Module, keep: bool):
    """DDP's no_sync for the micro-batches before a window's last: their gradients accumulate on
    each rank and are all-reduced once, with the last one's."""
    no_sync = getattr(model, "no_sync", None)
    return no_sync() if keep and no_sync is not None else contextlib.nullcontext()


def clipped_gradients(model: torch.nn.Module, parameters: list, max_norm: float) -> torch.Tensor:
    """The global gradient norm, clipped to max_norm; FSDP computes it over the ranks' shards itself."""
    clip = getattr(model, "clip_grad_norm_", None)
    return clip(max_norm) if clip is not None else torch.nn.utils.clip_grad_norm_(parameters, max_norm)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Sequence,
    device,
    chunk_tokens: Union[int, str] = "auto",
    precision: Optional[Precision] = None,
    world: World = World(),
    objective=None,
) -> float:
    """Mean loss per unit of the objective (SFT: supervised token) over the eval batches (dropout
    off, under the training precision when given), then back to training. Under torchrun each rank
    takes every N-th batch; all run the same number of forwards (FSDP gathers weights in each), a
    rank short of one repeats its first and counts it zero."""
    precision = precision or Precision.none()
    objective = objective or TokenObjective(summed_loss)
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    mine = list(batches[world.rank :: world.size])
    # The units of the whole eval set (every rank holds it): supervised tokens, or pairs (ORPO's NLL
    # share needs the whole set's chosen tokens, not this rank's).
    units = objective.start_window(batches)
    forwards = math.ceil(len(batches) / world.size)
    for index in range(forwards):
        batch = mine[index] if index < len(mine) else batches[0]
        with precision.autocast():
            batch_loss = objective.loss_sum(model, batch, device, chunk_tokens, counted=index < len(mine)).double()
        if index < len(mine):
            loss_sum += batch_loss
    model.train(was_training)
    total = summed(world, [loss_sum.item()])[0]
    return total / max(units, 1)


def data_stream(epoch_batches: Callable[[int], Sequence], epoch: int = 0, index: int = 0):
    """(epoch, index of the next micro-batch, micro-batch, whether it is the epoch's last) from a
    position on, across epochs; each epoch has its own seeded order, so a position alone restores
    the data order."""
    while True:
        batches = epoch_batches(epoch)
        if not batches:
            raise TrainingError("the training data produced no batches")
        for position in range(index, len(batches)):
            yield epoch, position + 1, batches[position], position + 1 == len(batches)
        epoch, index = epoch + 1, 0


def safe_exp(value: float) -> float:
    return math.exp(value) if value < 700 else math.inf


def nan_if_none(value: Optional[float]) -> float:
    return math.nan if value is None else value


def none_if_nan(value: float) -> Optional[float]:
    return None if math.isnan(value) else value
