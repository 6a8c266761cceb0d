"""The job's data side: the tokenizer and every row read, validated and tokenized (all data
errors surface here, before any weights load), each epoch's micro-batches, and how many optimizer
steps they make."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

from qlora import data
from qlora.config import JobConfig
from qlora.errors import ConfigError
from qlora.model.base import load_tokenizer


@dataclass
class PreparedData:
    train: data.TokenizedSet
    eval: Optional[data.TokenizedSet]
    eval_rows: list
    tokenizer: object


def prepare_data(config: JobConfig, echo: Callable[[str], None] = print) -> PreparedData:
    """Tokenizer + every row read, validated and tokenized: all data errors surface here."""
    check_device_support(config)
    tokenizer = load_tokenizer(
        config.model.tokenizer or config.model.name_or_path, config.model.revision, config.model.trust_remote_code
    )
    objective = config.train.objective
    rows = data.read_rows([(source.path, source.format) for source in config.data.sources()], objective=objective)
    if config.data.eval is not None:
        eval_rows = data.read_rows([(config.data.eval, config.data.format)], key="data.eval", objective=objective)
    elif config.data.eval_fraction is not None:
        rows, eval_rows = data.split_eval(rows, config.data.eval_fraction, config.train.seed)
    else:
        eval_rows = []
    # Tokenized sets are reused across runs (qlora/data/cache.py).
    if objective != "sft":
        shape = dict(max_seq_len=config.data.max_seq_len, too_long=config.data.too_long)
        tokenize = data.tokenize_pairs_cached
    else:
        shape = dict(max_seq_len=config.data.max_seq_len, train_on=config.data.train_on, too_long=config.data.too_long)
        tokenize = data.tokenize_rows_cached
    train_set, cache_hit = tokenize(rows, tokenizer, **shape)
    eval_set = tokenize(eval_rows, tokenizer, **shape)[0] if eval_rows else None
    echo(data.describe_data("train", train_set.stats) + (" (tokenized earlier: from the cache)" if cache_hit else ""))
    if eval_set:
        echo(data.describe_data("eval", eval_set.stats))
    first = train_set.examples[0]
    if objective != "sft":
        shown = [data.render_supervision(side, tokenizer) for side in (first.chosen, first.rejected)]
        echo("example pair (supervised spans in ⟦ ⟧):\nchosen:\n" + shown[0] + "\nrejected:\n" + shown[1])
    else:
        echo("example (supervised spans in ⟦ ⟧):\n" + data.render_supervision(first, tokenizer))
    return PreparedData(train=train_set, eval=eval_set, eval_rows=eval_rows, tokenizer=tokenizer)


def batch_maker(config: JobConfig, examples: list, pad_id: int, shuffle: bool = True) -> Callable[[int], list]:
    """epoch -> that epoch's micro-batches, in an order fixed by (seed, epoch)."""

    def epoch_batches(epoch: int) -> list:
        if config.train.objective != "sft":
            return data.epoch_pair_batches(
                examples, config.train.micro_batch_size, pad_id, config.train.seed, epoch, shuffle=shuffle
            )
        return data.epoch_batches(
            examples,
            micro_batch_size=config.train.micro_batch_size,
            packing=config.data.packing,
            padding_free=config.data.padding_free,
            max_seq_len=config.data.max_seq_len,
            pad_id=pad_id,
            seed=config.train.seed,
            epoch=epoch,
            shuffle=shuffle,
        )

    return epoch_batches


def epoch_length(config: JobConfig, examples: list) -> int:
    """Micro-batches per epoch, counted without building them."""
    if config.train.objective != "sft":
        return data.pair_batches_per_epoch(examples, config.train.micro_batch_size)
    return data.batches_per_epoch(
        examples, config.train.micro_batch_size, config.data.packing, config.data.max_seq_len, config.train.seed
    )


def check_device_support(config: JobConfig) -> None:
    import torch

    compute_dtype = config.quantization.compute_dtype
    if compute_dtype == "float16" and not torch.cuda.is_available():
        raise ConfigError("quantization.compute_dtype: float16 needs a CUDA GPU; use bfloat16 or float32 on CPU")
    if compute_dtype == "bfloat16" and torch.cuda.is_available():
        refusal = bf16_refusal(torch.cuda.get_device_name(), torch.cuda.get_device_capability())
        if refusal:
            raise ConfigError(refusal)


# Ampere: the first CUDA GPUs with bf16 tensor cores. Older cards (T4, V100) run bf16 only emulated
# (torch.cuda.is_bf16_supported() says yes to that), several times slower than their float16.
BF16_CAPABILITY = (8, 0)


def bf16_refusal(device_name: str, capability: tuple[int, int]) -> Optional[str]:
    """The one-line error for compute bfloat16 on a GPU without bf16 tensor cores, else None."""
    if tuple(capability) >= BF16_CAPABILITY:
        return None
    return (
        f"quantization.compute_dtype: bfloat16 needs a GPU of compute capability 8.0 or newer (Ampere+); "
        f"{device_name} is {capability[0]}.{capability[1]}: set quantization.compute_dtype: float16"
    )


def total_steps(config: JobConfig, batches_per_epoch: int, world_size: int = 1) -> int:
    """Optimizer steps; each takes grad_accum_steps micro-batches on each of `world_size` ranks,
    but an epoch's last, which takes what the epoch has left (the loop's window ends with it)."""
    if config.train.max_steps is not None:
        return config.train.max_steps
    epochs = config.train.epochs if config.train.epochs is not None else 1.0
    window = config.train.grad_accum_steps * world_size
    whole, part = divmod(epochs, 1)
    per_epoch = math.ceil(batches_per_epoch / window)
    return max(1, int(whole) * per_epoch + math.ceil(round(part * batches_per_epoch, 6) / window))
