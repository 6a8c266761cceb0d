"""`run_job(config)`: the one place that knows the order of a job.

config -> output dir check -> tokenizer + data (all rows validated) -> base + adapters ->
loop -> artifacts. Everything a user can get wrong is checked before the model loads and
before anything is written.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

from qlora import data
from qlora.adapters import attach_lora, save_adapter
from qlora.autobatch import confirm_micro_batch, resolve_micro_batch
from qlora.checkpoint import apply_umask, save_checkpoint
from qlora.config import JobConfig, dump_config
from qlora.errors import ConfigError, OutputError
from qlora.evaluate import ExactMatch, exact_match
from qlora.metrics import MetricsLog, file_size, format_bytes
from qlora.model import footprint_bytes, load_base, load_tokenizer, parameter_counts
from qlora.plot import write_loss_plot
from qlora.train import LoopResult, LoopSettings, train

FINISHED_MARKER = "summary.json"
# Written first into every output dir: --overwrite deletes only folders that hold it, so a
# mistyped output.dir (".", a home folder, a dataset folder) is never wiped.
OWNER_MARKER = ".qlora-run"


@dataclass
class PreparedData:
    train: data.TokenizedSet
    eval: Optional[data.TokenizedSet]
    eval_rows: list
    tokenizer: object


@dataclass
class JobResult:
    output_dir: Path
    adapter_path: Path
    adapter_bytes: int
    trainable_parameters: int
    total_parameters: int
    loop: LoopResult
    exact_match_before: Optional[ExactMatch]
    exact_match_after: Optional[ExactMatch]


def prepare_data(config: JobConfig, echo: Callable[[str], None] = print) -> PreparedData:
    """Tokenizer + every row read, validated and tokenized: all data errors surface here."""
    check_device_support(config)
    tokenizer = load_tokenizer(config.model.tokenizer or config.model.name_or_path, config.model.revision, config.model.trust_remote_code)
    rows = data.read_rows([(source.path, source.format) for source in config.data.sources()])
    if config.data.eval is not None:
        eval_rows = data.read_rows([(config.data.eval, config.data.format)], key="data.eval")
    elif config.data.eval_fraction is not None:
        rows, eval_rows = data.split_eval(rows, config.data.eval_fraction, config.train.seed)
    else:
        eval_rows = []
    shape = dict(max_seq_len=config.data.max_seq_len, train_on=config.data.train_on, too_long=config.data.too_long)
    train_set = data.tokenize_rows(rows, tokenizer, **shape)
    eval_set = data.tokenize_rows(eval_rows, tokenizer, **shape) if eval_rows else None
    echo(describe_data("train", train_set.stats))
    if eval_set:
        echo(describe_data("eval", eval_set.stats))
    echo("example (supervised spans in ⟦ ⟧):\n" + data.render_supervision(train_set.examples[0], tokenizer))
    return PreparedData(train=train_set, eval=eval_set, eval_rows=eval_rows, tokenizer=tokenizer)


def validate_job(config: JobConfig, echo: Callable[[str], None] = print) -> dict:
    """Everything `train` checks before loading the model, as a report; loads no weights."""
    prepared = prepare_data(config, echo)
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


def batch_maker(config: JobConfig, examples: list, pad_id: int, shuffle: bool = True) -> Callable[[int], list]:
    """epoch -> that epoch's micro-batches, in an order fixed by (seed, epoch)."""

    def epoch_batches(epoch: int) -> list:
        return data.epoch_batches(
            examples,
            micro_batch_size=config.train.micro_batch_size,
            packing=config.data.packing,
            max_seq_len=config.data.max_seq_len,
            pad_id=pad_id,
            seed=config.train.seed,
            epoch=epoch,
            shuffle=shuffle,
        )

    return epoch_batches


def epoch_length(config: JobConfig, examples: list) -> int:
    """Micro-batches per epoch, counted without building them."""
    return data.batches_per_epoch(examples, config.train.micro_batch_size, config.data.packing, config.data.max_seq_len, config.train.seed)


def run_job(config: JobConfig, *, overwrite: bool = False, echo: Callable[[str], None] = print) -> JobResult:
    import torch
    from transformers import set_seed

    output_dir = Path(config.output.dir)
    check_output_dir(output_dir, overwrite)
    prepared = prepare_data(config, echo)
    auto_budget = resolve_micro_batch(config, echo)
    tokenizer = prepared.tokenizer

    epoch_batches = batch_maker(config, prepared.train.examples, tokenizer.pad_token_id)
    eval_batches = batch_maker(config, prepared.eval.examples, tokenizer.pad_token_id, shuffle=False)(0) if prepared.eval else []
    max_steps = total_steps(config, epoch_length(config, prepared.train.examples))
    start_output_dir(output_dir, overwrite)
    (output_dir / "config.yaml").write_text(dump_config(config))

    set_seed(config.train.seed)
    quant = config.quantization
    base = load_base(
        config.model.name_or_path,
        bits=quant.bits,
        quant_type=quant.quant_type,
        double_quant=quant.double_quant,
        compute_dtype=quant.compute_dtype,
        gradient_checkpointing=config.train.gradient_checkpointing,
        revision=config.model.revision,
        trust_remote_code=config.model.trust_remote_code,
        init=config.model.init,
        seed=config.train.seed,
    )
    echo(f"base: {config.model.name_or_path} ({describe_quantization(config)}), {format_bytes(footprint_bytes(base))} in memory")
    lora = config.lora
    model = attach_lora(
        base,
        r=lora.r,
        alpha=lora.alpha,
        dropout=lora.dropout,
        target_modules=lora.target_modules,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        seed=config.train.seed,
    )
    trainable, total = parameter_counts(model)
    echo(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%), LoRA r={lora.r} alpha={lora.alpha:g}")
    if auto_budget is not None:
        confirm_micro_batch(model, config, auto_budget, len(tokenizer), echo)
        max_steps = total_steps(config, epoch_length(config, prepared.train.examples))

    exact_rows = [row for row in prepared.eval_rows if row.format != "text"][: config.train.eval_exact_match]
    exact_before = run_exact_match(model, tokenizer, exact_rows, config, echo, "before training")

    settings = LoopSettings(
        max_steps=max_steps,
        grad_accum_steps=config.train.grad_accum_steps,
        learning_rate=config.train.learning_rate,
        lr_schedule=config.train.lr_schedule,
        warmup_steps=config.train.warmup_steps,
        optimizer=config.train.optimizer,
        weight_decay=config.train.weight_decay,
        max_grad_norm=config.train.max_grad_norm,
        eval_every=config.train.eval_every,
        save_every=config.train.save_every,
        log_every=config.train.log_every,
        mixed_precision=mixed_precision(quant.compute_dtype, torch.cuda.is_available()),
    )
    metrics = MetricsLog(output_dir / "metrics.jsonl")
    try:
        loop = train(model, epoch_batches, eval_batches, settings, metrics, checkpoint_writer(model, output_dir, config.train.keep_checkpoints))
    finally:
        metrics.close()

    exact_after = run_exact_match(model, tokenizer, exact_rows, config, echo, "after training")
    adapter_path = write_artifacts(model, tokenizer, output_dir)
    result = JobResult(
        output_dir=output_dir,
        adapter_path=adapter_path,
        adapter_bytes=file_size(adapter_path),
        trainable_parameters=trainable,
        total_parameters=total,
        loop=loop,
        exact_match_before=exact_before,
        exact_match_after=exact_after,
    )
    metrics_rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    write_loss_plot(metrics_rows, output_dir / "loss.svg", title=f"{'/'.join(Path(config.model.name_or_path).parts[-2:])} + LoRA r={lora.r}")
    write_atomically(output_dir / FINISHED_MARKER, json.dumps(summary_record(result, prepared), indent=2))
    echo(describe_result(result))
    return result


# --------------------------------------------------------------------------- helpers


def checkpoint_writer(model, output_dir: Path, keep: int):
    """The loop's save hook: adapter + optimizer and schedule state, published atomically."""
    import torch

    def save(step: int, optimizer, scheduler) -> None:
        def write(folder: Path) -> None:
            save_adapter(model, folder)
            torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, folder / "training_state.pt")

        save_checkpoint(output_dir / "checkpoints", step, write, keep)

    return save


def check_device_support(config: JobConfig) -> None:
    import torch

    if config.quantization.compute_dtype == "float16" and not torch.cuda.is_available():
        raise ConfigError("quantization.compute_dtype: float16 needs a CUDA GPU; use bfloat16 or float32 on CPU")


def mixed_precision(compute_dtype: str, on_cuda: bool) -> str:
    """accelerate's mixed-precision mode. bitsandbytes already computes the 4-bit layers in
    compute_dtype; on CPU, bfloat16 autocast on top only slowed steps down (demo model, compute
    bfloat16, 20 steps: 31 s without autocast, 40 s with), so CPU runs without autocast."""
    if not on_cuda:
        return "no"
    return {"bfloat16": "bf16", "float16": "fp16"}.get(compute_dtype, "no")


def total_steps(config: JobConfig, batches_per_epoch: int) -> int:
    if config.train.max_steps is not None:
        return config.train.max_steps
    epochs = config.train.epochs if config.train.epochs is not None else 1.0
    return max(1, math.ceil(epochs * batches_per_epoch / config.train.grad_accum_steps))


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Refuse to touch a finished or foreign run unless --overwrite; fail early if unwritable."""
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputError(f"output.dir: {output_dir} exists and is not a directory")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        if not (output_dir / OWNER_MARKER).exists():
            raise OutputError(f"output.dir: {output_dir} holds files qlora did not write; choose another output.dir (--overwrite only replaces qlora output folders)")
        if not overwrite:
            what = "a finished run" if (output_dir / FINISHED_MARKER).exists() else "an unfinished run"
            raise OutputError(f"output.dir: {output_dir} already holds {what}; pass --overwrite to replace it, or choose another output.dir")
    existing = output_dir
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK):
        raise OutputError(f"output.dir: cannot write to {existing}")


def start_output_dir(output_dir: Path, overwrite: bool) -> None:
    if overwrite and output_dir.is_dir():
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / OWNER_MARKER).write_text("written by qlora: `qlora train --overwrite` may replace this folder\n")


def write_artifacts(model, tokenizer, output_dir: Path) -> Path:
    """Adapter + tokenizer written to a temp dir, then moved in file by file with atomic renames,
    so a reader never sees a half-written adapter_model.safetensors."""
    staging = Path(tempfile.mkdtemp(prefix=".artifacts-", dir=output_dir))
    try:
        save_adapter(model, staging)
        tokenizer.save_pretrained(str(staging))
        apply_umask(staging)
        for path in sorted(staging.iterdir()):
            os.replace(path, output_dir / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir / "adapter_model.safetensors"


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def run_exact_match(model, tokenizer, rows, config: JobConfig, echo, when: str) -> Optional[ExactMatch]:
    if not rows:
        return None
    result = exact_match(model, tokenizer, rows, config.train.eval_max_new_tokens)
    echo(f"exact match {when}: {result.correct}/{result.total} = {100 * result.score:.1f}%")
    for prompt, reference, answer in result.samples[:2]:
        echo(f"  expected {reference!r}, got {answer!r}")
    return result


def describe_quantization(config: JobConfig) -> str:
    quant = config.quantization
    if quant.bits == 4:
        return f"{quant.quant_type.upper()}{' + double quant' if quant.double_quant else ''}, compute {quant.compute_dtype}"
    if quant.bits == 8:
        return f"LLM.int8, compute {quant.compute_dtype}"
    return f"unquantized {quant.compute_dtype}"


def describe_data(name: str, stats: dict) -> str:
    parts = [
        f"{stats['kept']} rows kept of {stats['rows']}",
        f"{stats['supervised_tokens']:,} supervised / {stats['total_tokens']:,} tokens",
        f"row length min/p50/p95/max {stats['length_min']}/{stats['length_p50']}/{stats['length_p95']}/{stats['length_max']}",
    ]
    if stats["rows_over_max_seq_len"]:
        dropped = stats["dropped_too_long"] + stats["dropped_no_supervision_after_truncation"]
        parts.append(f"{stats['rows_over_max_seq_len']} over max_seq_len ({stats['truncated']} truncated, {dropped} dropped)")
    return f"{name} data: " + ", ".join(parts)


def summary_record(result: JobResult, prepared: PreparedData) -> dict:
    loop = asdict(result.loop)
    loop["tokens_per_s"] = result.loop.tokens_per_s
    record = {
        "adapter": str(result.adapter_path),
        "adapter_bytes": result.adapter_bytes,
        "trainable_parameters": result.trainable_parameters,
        "total_parameters": result.total_parameters,
        "train_data": prepared.train.stats,
        "eval_data": prepared.eval.stats if prepared.eval else None,
        **loop,
    }
    for name, value in (("exact_match_before", result.exact_match_before), ("exact_match_after", result.exact_match_after)):
        if value is not None:
            record[name] = value.score
    return record


def describe_result(result: JobResult) -> str:
    loop = result.loop
    lines = [
        "done.",
        f"  steps            {loop.steps} ({loop.seconds:.1f} s)",
        f"  tokens           {loop.supervised_tokens:,} supervised of {loop.tokens:,} ({loop.tokens_per_s:,.0f} supervised tokens/s)",
        f"  peak memory      {format_bytes(loop.peak_memory_bytes)} ({loop.peak_memory_kind.replace('_', ' ')})",
        f"  final train loss {loop.final_loss:.4f}",
    ]
    if loop.eval_loss is not None:
        before = f" (before training {loop.eval_loss_before:.4f})" if loop.eval_loss_before is not None else ""
        lines.append(f"  final eval loss  {loop.eval_loss:.4f}, perplexity {math.exp(min(loop.eval_loss, 700)):.2f}{before}")
    if result.exact_match_after is not None:
        lines.append(f"  exact match      {100 * result.exact_match_before.score:.1f}% -> {100 * result.exact_match_after.score:.1f}%")
    lines.append(f"  trainable        {result.trainable_parameters:,} parameters")
    lines.append(f"  adapter          {result.adapter_path} ({format_bytes(result.adapter_bytes)})")
    return "\n".join(lines)
