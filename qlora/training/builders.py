"""Config sections -> the objects the loop is handed: optimizer, schedule, settings (and the
precision: qlora.training.precision).

The loop takes these built (torchtune's recipes do the same in their setup functions), so it
never reads a config and every default lives once, in the schema (qlora.config.schema).
"""

from __future__ import annotations

import math

import torch

from qlora.config import TrainSection
from qlora.training.loop import LoopSettings


def build_optimizer(model: torch.nn.Module, train: TrainSection) -> torch.optim.Optimizer:
    """train.optimizer over the model's trainable parameters (the LoRA weights)."""
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    if train.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=train.learning_rate, weight_decay=train.weight_decay)
    import bitsandbytes as bnb

    optimizer_class = {"paged_adamw_8bit": bnb.optim.PagedAdamW8bit, "adamw_8bit": bnb.optim.AdamW8bit}[train.optimizer]
    return optimizer_class(parameters, lr=train.learning_rate, weight_decay=train.weight_decay)


def build_schedule(
    optimizer: torch.optim.Optimizer, train: TrainSection, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the peak, then cosine/linear decay to zero at max_steps (or constant)."""
    warmup, schedule = train.warmup_steps, train.lr_schedule

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, max_steps - warmup)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def loop_settings(train: TrainSection, max_steps: int) -> LoopSettings:
    """The loop's own numbers from the train section; max_steps counted by the job from the data."""
    return LoopSettings(
        max_steps=max_steps,
        grad_accum_steps=train.grad_accum_steps,
        max_grad_norm=train.max_grad_norm,
        eval_every=train.eval_every,
        save_every=train.save_every,
        log_every=train.log_every,
        offload_activations=train.offload_activations,
        loss_chunk_tokens=train.loss_chunk_tokens,
    )
