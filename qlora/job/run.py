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
from qlora.adapters import attach_lora, load_adapter_weights, save_adapter, write_manifest
from qlora.adapters.exact_match import ExactMatch, exact_match
from qlora.config import JobConfig, dump_config
from qlora.errors import CheckpointError, ConfigError
from qlora.job.resume import check_same_run, find_checkpoint, rewind_metrics, run_record
from qlora.model.base import load_base, load_tokenizer, parameter_counts, weight_bytes
from qlora.model.host_memory import keep_large_blocks_out_of_the_heap
from qlora.output_dir import (
    FINISHED_MARKER,
    apply_umask,
    check_output_dir,
    claim_output_dir,
    unfinished,
    write_atomically,
)
from qlora.plan.mfu import job_flop_meter
from qlora.plan.micro_batch import confirm_micro_batch, resolve_micro_batch
from qlora.sizes import file_size, format_bytes
from qlora.training.checkpoint import (
    TrainingState,
    load_training_state,
    remove_partial_checkpoints,
    save_checkpoint,
    save_training_state,
    verify_checkpoint,
)
from qlora.training.loop import LoopResult, LoopSettings, train
from qlora.training.metrics import MetricsLog
from qlora.training.plot import write_loss_plot


@dataclass
class PreparedData:
    train: data.TokenizedSet
    eval: Optional[data.TokenizedSet]
    eval_rows: list
    tokenizer: object


@dataclass
class ResumePoint:
    checkpoint: Path
    state: TrainingState
    run: dict
    """The run record saved with the checkpoint."""


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
    tokenizer = load_tokenizer(
        config.model.tokenizer or config.model.name_or_path, config.model.revision, config.model.trust_remote_code
    )
    rows = data.read_rows([(source.path, source.format) for source in config.data.sources()])
    if config.data.eval is not None:
        eval_rows = data.read_rows([(config.data.eval, config.data.format)], key="data.eval")
    elif config.data.eval_fraction is not None:
        rows, eval_rows = data.split_eval(rows, config.data.eval_fraction, config.train.seed)
    else:
        eval_rows = []
    shape = dict(max_seq_len=config.data.max_seq_len, train_on=config.data.train_on, too_long=config.data.too_long)
    train_set, cache_hit = data.tokenize_rows_cached(
        rows, tokenizer, **shape
    )  # reused across runs: qlora/data/cache.py
    eval_set = data.tokenize_rows_cached(eval_rows, tokenizer, **shape)[0] if eval_rows else None
    echo(data.describe_data("train", train_set.stats) + (" (tokenized earlier: from the cache)" if cache_hit else ""))
    if eval_set:
        echo(data.describe_data("eval", eval_set.stats))
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
    return data.batches_per_epoch(
        examples, config.train.micro_batch_size, config.data.packing, config.data.max_seq_len, config.train.seed
    )


def run_job(
    config: JobConfig,
    *,
    overwrite: bool = False,
    resume_from: Optional[str] = None,
    resume_anyway: bool = False,
    stop_requested: Callable[[], bool] = lambda: False,
    echo: Callable[[str], None] = print,
) -> JobResult:
    """Train the job, resuming from its newest complete checkpoint (or `resume_from`) if any.

    Every check (output dir, checkpoint, data, the checkpoint belonging to this run) happens
    before the model loads and before anything is written.
    """
    output_dir = Path(config.output.dir)
    if overwrite and resume_from:
        raise ConfigError("--overwrite and --resume-from: choose one (start over, or resume)")
    check_output_dir(output_dir, overwrite)
    checkpoint = None if overwrite else find_checkpoint(output_dir, resume_from)
    prepared = prepare_data(config, echo)
    auto_budget = resolve_micro_batch(config, echo)
    resume = None
    if checkpoint:
        verify_checkpoint(checkpoint)
        resume = ResumePoint(checkpoint, *load_training_state(checkpoint))
        if auto_budget is not None:
            # The data position counts the checkpoint's micro-batches: keep the size it trained
            # with, whatever auto would pick on this machine now.
            saved = resume.run.get("config", {})
            config.train.micro_batch_size = saved.get("train.micro_batch_size", config.train.micro_batch_size)
            config.train.grad_accum_steps = saved.get("train.grad_accum_steps", config.train.grad_accum_steps)
    record = run_record(config, prepared.train.examples, prepared.eval.examples if prepared.eval else [])
    if resume:
        check_same_run(checkpoint, resume.run, record, resume_anyway, echo)
    max_steps = total_steps(config, epoch_length(config, prepared.train.examples))
    if resume and resume.state.step > max_steps:
        raise CheckpointError(f"{checkpoint}: at step {resume.state.step}, past the job's {max_steps} optimizer steps")
    if checkpoint is None and unfinished(output_dir) and not overwrite:
        echo(f"{output_dir} holds an unfinished run with no complete checkpoint: starting over")

    with claim_output_dir(output_dir, wipe=checkpoint is None):
        if resume:
            removed = remove_partial_checkpoints(output_dir / "checkpoints")
            rewind_metrics(output_dir / "metrics.jsonl", resume.state.step)
            note = f"; removed {len(removed)} partial checkpoint(s) a killed writer left" if removed else ""
            echo(f"resuming from {checkpoint} (step {resume.state.step} of {max_steps}){note}")
        (output_dir / "config.yaml").write_text(dump_config(config))
        return train_and_publish(config, prepared, record, resume, max_steps, auto_budget, stop_requested, echo)


def train_and_publish(
    config: JobConfig,
    prepared: PreparedData,
    record: dict,
    resume: Optional[ResumePoint],
    max_steps: int,
    auto_budget: Optional[int],
    stop_requested,
    echo,
) -> JobResult:
    """Base + adapters (restored from the `resume` checkpoint if given) -> loop -> artifacts."""
    import torch
    from transformers import set_seed

    output_dir = Path(config.output.dir)
    tokenizer = prepared.tokenizer
    epoch_batches = batch_maker(config, prepared.train.examples, tokenizer.pad_token_id)
    eval_batches = (
        batch_maker(config, prepared.eval.examples, tokenizer.pad_token_id, shuffle=False)(0) if prepared.eval else []
    )

    set_seed(config.train.seed)
    if not torch.cuda.is_available():
        keep_large_blocks_out_of_the_heap()  # the step's host memory, given back: qlora/model/host_memory.py
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
    echo(
        f"base: {config.model.name_or_path} ({describe_quantization(config)}), {format_bytes(weight_bytes(base))} in memory"
    )
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
    echo(
        f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%), LoRA r={lora.r} alpha={lora.alpha:g}"
    )
    if auto_budget is not None and resume is None:
        # A resumed run keeps the micro-batch its checkpoint was trained with (checked above).
        confirm_micro_batch(model, config, auto_budget, len(tokenizer), echo)
        max_steps = total_steps(config, epoch_length(config, prepared.train.examples))
        record = run_record(config, prepared.train.examples, prepared.eval.examples if prepared.eval else [])

    exact_rows = [row for row in prepared.eval_rows if row.format != "text"][: config.train.eval_exact_match]
    if resume:
        load_adapter_weights(model, resume.checkpoint)
        exact_before = restore_exact_match(resume.run.get("exact_match_before"))
    else:
        exact_before = run_exact_match(model, tokenizer, exact_rows, config, echo, "before training")
    run = {**record, "exact_match_before": asdict(exact_before) if exact_before else None}

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
        offload_activations=config.train.offload_activations,
        loss_chunk_tokens=config.train.loss_chunk_tokens,
    )
    metrics = MetricsLog(output_dir / "metrics.jsonl")
    writer = checkpoint_writer(model, output_dir, config.train.keep_checkpoints, run)
    try:
        meter = job_flop_meter(
            config.model.name_or_path, trainable, quant.compute_dtype, config.model.trust_remote_code
        )
        loop = train(
            model,
            epoch_batches,
            eval_batches,
            settings,
            metrics,
            writer,
            resume=resume.state if resume else None,
            stop_requested=stop_requested,
            flop_meter=meter,
        )
    finally:
        metrics.close()

    exact_after = run_exact_match(model, tokenizer, exact_rows, config, echo, "after training")
    adapter_path = write_artifacts(model, tokenizer, output_dir, config)
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
    write_loss_plot(
        metrics_rows,
        output_dir / "loss.svg",
        title=f"{'/'.join(Path(config.model.name_or_path).parts[-2:])} + LoRA r={lora.r}",
    )
    write_atomically(output_dir / FINISHED_MARKER, json.dumps(summary_record(result, prepared), indent=2))
    echo(describe_result(result))
    return result


# --------------------------------------------------------------------------- helpers


def checkpoint_writer(model, output_dir: Path, keep: int, run: dict) -> Callable[[TrainingState], Path]:
    """The loop's save hook: adapter + training state + run record, published atomically."""

    def save(state: TrainingState) -> Path:
        def write(folder: Path) -> None:
            save_adapter(model, folder)
            save_training_state(folder, state, run)

        return save_checkpoint(output_dir / "checkpoints", state.step, write, keep)

    return save


def restore_exact_match(saved: Optional[dict]) -> Optional[ExactMatch]:
    return ExactMatch(**{**saved, "samples": [tuple(sample) for sample in saved["samples"]]}) if saved else None


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


def write_artifacts(model, tokenizer, output_dir: Path, config: JobConfig) -> Path:
    """Adapter + tokenizer written to a temp dir, then moved in file by file with atomic renames,
    so a reader never sees a half-written adapter_model.safetensors."""
    staging = Path(tempfile.mkdtemp(prefix=".artifacts-", dir=output_dir))
    try:
        save_adapter(model, staging)
        write_manifest(
            staging,
            base_config=model.config.to_dict(),
            name_or_path=config.model.name_or_path,
            revision=config.model.revision,
            quantization=config.quantization.model_dump(),
            data_files=[source.path for source in config.data.sources()]
            + ([config.data.eval] if config.data.eval else []),
        )
        tokenizer.save_pretrained(str(staging))
        apply_umask(staging)
        for path in sorted(staging.iterdir()):
            os.replace(path, output_dir / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir / "adapter_model.safetensors"


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
    for name, value in (
        ("exact_match_before", result.exact_match_before),
        ("exact_match_after", result.exact_match_after),
    ):
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
        f"  MFU              {loop.mfu:.1%} of a measured peak of {loop.peak_flops_per_s / 1e9:,.0f} GFLOP/s (useful FLOPs: qlora/plan/flops.py)",
    ]
    if loop.eval_loss is not None:
        before = f" (before training {loop.eval_loss_before:.4f})" if loop.eval_loss_before is not None else ""
        lines.append(
            f"  final eval loss  {loop.eval_loss:.4f}, perplexity {math.exp(min(loop.eval_loss, 700)):.2f}{before}"
        )
    if result.exact_match_after is not None:
        lines.append(
            f"  exact match      {100 * result.exact_match_before.score:.1f}% -> {100 * result.exact_match_after.score:.1f}%"
        )
    lines.append(f"  trainable        {result.trainable_parameters:,} parameters")
    lines.append(f"  adapter          {result.adapter_path} ({format_bytes(result.adapter_bytes)})")
    return "\n".join(lines)
