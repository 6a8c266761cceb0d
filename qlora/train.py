"""The training loop: one screenful, top to bottom.

It receives built objects (a model with trainable adapters, a function giving each epoch's
micro-batches, eval batches) and knows nothing of configs, files or where the model came
from, so it runs on any tiny torch model. A batch is anything with `input_ids`,
`position_ids`, `targets` (next-token ids, -100 where unsupervised), `attention_mask` (or None)
and `supervised_tokens`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from qlora.errors import TrainingError
from qlora.metrics import MetricsLog, peak_memory, progress_bar, reset_peak_memory


@dataclass(frozen=True)
class LoopSettings:
    max_steps: int
    grad_accum_steps: int
    learning_rate: float
    lr_schedule: str = "cosine"
    warmup_steps: int = 0
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    max_grad_norm: Optional[float] = 1.0
    eval_every: Optional[int] = None
    save_every: Optional[int] = None
    log_every: int = 1
    mixed_precision: str = "no"  # "bf16" | "fp16" | "no", as accelerate names them


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

    @property
    def tokens_per_s(self) -> float:
        return self.supervised_tokens / self.seconds if self.seconds else 0.0


def train(
    model: torch.nn.Module,
    epoch_batches: Callable[[int], Sequence],
    eval_batches: Sequence = (),
    settings: LoopSettings = None,
    metrics: Optional[MetricsLog] = None,
    save_checkpoint: Optional[Callable[[int, torch.optim.Optimizer, object], None]] = None,
) -> LoopResult:
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=settings.mixed_precision, cpu=not torch.cuda.is_available())
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = build_optimizer(parameters, settings)
    scheduler = build_schedule(optimizer, settings)
    # prepare() wraps forward in autocast for mixed precision (and a grad scaler for fp16).
    model, optimizer = accelerator.prepare(model, optimizer)
    micro_batches = endless(epoch_batches)
    model.train()
    reset_peak_memory()

    # The untrained baseline, so every run shows how far the adapter moved the eval loss.
    eval_loss = eval_loss_before = evaluate(model, eval_batches, accelerator.device) if eval_batches else math.nan
    if metrics and eval_batches:
        metrics.write({"step": 0, "eval_loss": eval_loss, "eval_perplexity": safe_exp(eval_loss)})

    bar = progress_bar(settings.max_steps, "training")
    started = time.perf_counter()
    total_supervised = total_tokens = 0
    loss = math.nan
    for step in range(1, settings.max_steps + 1):
        # Normalize by the supervised tokens of the WHOLE accumulation window, so a token
        # weighs the same whichever micro-batch it landed in (per-micro-batch means do not).
        window = [next(micro_batches) for _ in range(settings.grad_accum_steps)]
        window_supervised = sum(batch.supervised_tokens for batch in window)
        loss_sum = torch.zeros((), device=accelerator.device)
        for batch in window:
            batch_loss_sum = summed_loss(model, batch, accelerator.device)
            accelerator.backward(batch_loss_sum / max(window_supervised, 1))
            loss_sum += batch_loss_sum.detach()
            total_tokens += batch.input_ids.numel()
        lr = scheduler.get_last_lr()[0]  # the rate this step uses; after scheduler.step() it is the next one's
        grad_norm = None
        if settings.max_grad_norm:
            grad_norm = accelerator.clip_grad_norm_(parameters, settings.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        # One host sync per optimizer step (not per micro-batch): needed to stop on NaN.
        loss = loss_sum.item() / max(window_supervised, 1)
        if not math.isfinite(loss):
            raise TrainingError(f"step {step}: loss is {loss}; lower train.learning_rate or check the data")
        total_supervised += window_supervised
        elapsed = time.perf_counter() - started
        row = {
            "step": step,
            "loss": loss,
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "supervised_tokens": window_supervised,
            "tokens_per_s": total_supervised / elapsed,
            "elapsed_s": elapsed,
        }
        last_step = step == settings.max_steps
        if eval_batches and ((settings.eval_every and step % settings.eval_every == 0) or last_step):
            eval_loss = evaluate(model, eval_batches, accelerator.device)
            row.update(eval_loss=eval_loss, eval_perplexity=safe_exp(eval_loss))
        if metrics:
            metrics.write(row)
        if save_checkpoint and settings.save_every and step % settings.save_every == 0:
            save_checkpoint(step, optimizer, scheduler)
        if step % settings.log_every == 0 or last_step:
            bar.set_postfix(loss=f"{loss:.4f}", eval=f"{eval_loss:.4f}", tok_s=f"{row['tokens_per_s']:.0f}", refresh=False)
        bar.update(1)
    bar.close()

    kind, peak = peak_memory()
    return LoopResult(
        steps=settings.max_steps,
        supervised_tokens=total_supervised,
        tokens=total_tokens,
        seconds=time.perf_counter() - started,
        final_loss=loss,
        eval_loss=None if math.isnan(eval_loss) else eval_loss,
        eval_loss_before=None if math.isnan(eval_loss_before) else eval_loss_before,
        peak_memory_kind=kind,
        peak_memory_bytes=peak,
    )


def summed_loss(model: torch.nn.Module, batch, device) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropy over the batch's supervised targets."""
    attention_mask = batch.attention_mask.to(device) if batch.attention_mask is not None else None
    logits = model(
        input_ids=batch.input_ids.to(device),
        position_ids=batch.position_ids.to(device),
        attention_mask=attention_mask,
        use_cache=False,
    ).logits
    targets = batch.targets.to(device)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Sequence, device) -> float:
    """Mean loss per supervised token over the eval batches (dropout off), then back to training."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    supervised = 0
    for batch in batches:
        loss_sum += summed_loss(model, batch, device).double()
        supervised += batch.supervised_tokens
    model.train(was_training)
    return loss_sum.item() / max(supervised, 1)


def endless(epoch_batches: Callable[[int], Sequence]):
    """Micro-batches across epoch boundaries; each epoch has its own shuffled order."""
    epoch = 0
    while True:
        batches = epoch_batches(epoch)
        if not batches:
            raise TrainingError("the training data produced no batches")
        yield from batches
        epoch += 1


def build_optimizer(parameters: list[torch.nn.Parameter], settings: LoopSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    import bitsandbytes as bnb

    optimizer_class = {"paged_adamw_8bit": bnb.optim.PagedAdamW8bit, "adamw_8bit": bnb.optim.AdamW8bit}[settings.optimizer]
    return optimizer_class(parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay)


def build_schedule(optimizer: torch.optim.Optimizer, settings: LoopSettings) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the peak, then cosine/linear decay to zero at max_steps (or constant)."""
    warmup, total = settings.warmup_steps, settings.max_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        if settings.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if settings.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def safe_exp(value: float) -> float:
    return math.exp(value) if value < 700 else math.inf
