"""What a finished job leaves: the adapter, tokenizer and manifest moved in atomically, the loss
plot, summary.json (written last: its presence marks a finished run) and the printed summary;
and the loop's checkpoint hook. Exact match before/after training is run and reported here too."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

from qlora.adapters import save_adapter, write_manifest
from qlora.adapters.exact_match import ExactMatch, exact_match
from qlora.config import JobConfig
from qlora.output_dir import FINISHED_MARKER, apply_umask, disk_full_explained, write_atomically
from qlora.sizes import file_size, format_bytes
from qlora.training.checkpoint import (
    PREFIX,
    TrainingState,
    complete_checkpoints,
    save_checkpoint,
    save_training_state,
)
from qlora.training.distributed import World, agreed
from qlora.training.loop import LoopResult
from qlora.training.plot import write_loss_plot


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


def publish(
    model,
    tokenizer,
    config: JobConfig,
    data_stats: dict,
    loop: LoopResult,
    parameters: tuple[int, int],
    exact: tuple[Optional[ExactMatch], Optional[ExactMatch]],
    echo: Callable[[str], None],
    world: World = World(),
    adapter_state: Optional[dict] = None,
) -> JobResult:
    """The artifacts, the loss plot, then summary.json last; prints the summary. `data_stats` is
    {"train_data": stats, "eval_data": stats or None}; `parameters` (trainable, total);
    `exact` the exact match (before, after) training; `world` the processes that trained;
    `adapter_state` the adapter's tensors gathered from FSDP shards (None: the model's own)."""
    output_dir = Path(config.output.dir)
    formats = data_stats["train_data"].get("formats")
    with disk_full_explained(
        "the adapter, its tokenizer, manifest, plot and summary",
        output_dir,
        last_good=lambda: newest_checkpoint(output_dir),
        needed=lambda: trainable_bytes(model),
    ):
        adapter_path = write_artifacts(model, tokenizer, output_dir, config, world, adapter_state, formats)
        result = JobResult(
            output_dir=output_dir,
            adapter_path=adapter_path,
            adapter_bytes=file_size(adapter_path),
            trainable_parameters=parameters[0],
            total_parameters=parameters[1],
            loop=loop,
            exact_match_before=exact[0],
            exact_match_after=exact[1],
        )
        metrics_rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
        title = f"{'/'.join(Path(config.model.name_or_path).parts[-2:])} + LoRA r={config.lora.r}"
        write_loss_plot(metrics_rows, output_dir / "loss.svg", title=title)
        write_atomically(output_dir / FINISHED_MARKER, json.dumps(summary_record(result, data_stats), indent=2))
        echo(describe_result(result))
        return result


def checkpoint_writer(
    model,
    output_dir: Path,
    keep: int,
    run: dict,
    world: World = World(),
    adapter_state: Callable[[], Optional[dict]] = lambda: None,
) -> Callable[[TrainingState], Path]:
    """The loop's save hook: adapter + training state + run record, published atomically.
    Called on every rank (`adapter_state()` gathers FSDP's shards: a collective); rank 0
    writes, and no rank goes on (or exits) before it is complete."""

    def save(state: TrainingState) -> Path:
        gathered = adapter_state()

        def write(folder: Path) -> None:
            save_adapter(model, folder, state_dict=gathered)
            save_training_state(folder, state, run)

        root = output_dir / "checkpoints"

        def written_by_rank_0() -> Optional[Path]:
            if not world.is_main:
                return None
            with disk_full_explained(
                f"the step-{state.step} checkpoint",
                root,
                last_good=lambda: newest_checkpoint(output_dir),
                needed=lambda: trainable_bytes(model) + tensor_bytes(state.optimizer),
            ):
                return save_checkpoint(root, state.step, write, keep)

        # agreed, not a bare barrier: a write failing on rank 0 (a full disk) fails every rank.
        written = agreed(world, written_by_rank_0)
        return written if world.is_main else root / f"{PREFIX}{state.step:08d}"

    return save


def newest_checkpoint(output_dir: Path) -> Optional[Path]:
    complete = complete_checkpoints(output_dir / "checkpoints")
    return complete[-1] if complete else None


def trainable_bytes(model) -> int:
    return sum(parameter.nbytes for parameter in model.parameters() if parameter.requires_grad)


def tensor_bytes(value) -> int:
    """Bytes of the tensors in a (nested) state dict."""
    if hasattr(value, "nbytes") and hasattr(value, "dim"):
        return value.nbytes
    if isinstance(value, dict):
        return sum(tensor_bytes(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(item) for item in value)
    return 0


def restore_exact_match(saved: Optional[dict]) -> Optional[ExactMatch]:
    return ExactMatch(**{**saved, "samples": [tuple(sample) for sample in saved["samples"]]}) if saved else None


def run_exact_match(model, tokenizer, rows, config: JobConfig, echo, when: str) -> Optional[ExactMatch]:
    if not rows:
        return None
    result = exact_match(model, tokenizer, rows, config.train.eval_max_new_tokens)
    echo(f"exact match {when}: {result.correct}/{result.total} = {100 * result.score:.1f}%")
    for prompt, reference, answer in result.samples[:2]:
        echo(f"  expected {reference!r}, got {answer!r}")
    return result


def write_artifacts(
    model,
    tokenizer,
    output_dir: Path,
    config: JobConfig,
    world: World = World(),
    adapter_state=None,
    data_formats: Optional[list[str]] = None,
) -> Path:
    """Adapter + tokenizer written to a temp dir, then moved in file by file with atomic renames,
    so a reader never sees a half-written adapter_model.safetensors."""
    staging = Path(tempfile.mkdtemp(prefix=".artifacts-", dir=output_dir))
    try:
        save_adapter(model, staging, state_dict=adapter_state)
        write_manifest(
            staging,
            base_config=model.config.to_dict(),
            name_or_path=config.model.name_or_path,
            revision=config.model.revision,
            quantization=config.quantization,
            data_files=[source.path for source in config.data.sources()]
            + ([config.data.eval] if config.data.eval else []),
            processes={"world_size": world.size, "strategy": world.strategy},
            data_formats=data_formats,
        )
        tokenizer.save_pretrained(str(staging))
        apply_umask(staging)
        for path in sorted(staging.iterdir()):
            os.replace(path, output_dir / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir / "adapter_model.safetensors"


def summary_record(result: JobResult, data_stats: dict) -> dict:
    loop = asdict(result.loop)
    loop["tokens_per_s"] = result.loop.tokens_per_s
    loop.update(loop.pop("readings") or {})  # the objective's last step: rewards/... for dpo and orpo
    record = {
        "adapter": str(result.adapter_path),
        "adapter_bytes": result.adapter_bytes,
        "trainable_parameters": result.trainable_parameters,
        "total_parameters": result.total_parameters,
        **data_stats,
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
        f"  tokens           {loop.supervised_tokens:,} supervised of {loop.tokens:,} "
        f"({loop.tokens_per_s:,.0f} supervised tokens/s)",
        f"  peak memory      {format_bytes(loop.peak_memory_bytes)} ({loop.peak_memory_kind.replace('_', ' ')})",
        f"  final train loss {loop.final_loss:.4f}",
        f"  MFU              {loop.mfu:.1%} of a measured peak of {loop.peak_flops_per_s / 1e9:,.0f} GFLOP/s "
        "(useful FLOPs: qlora/plan/flops.py)",
    ]
    readings = loop.readings or {}
    pairs = "logps/accuracy" in readings  # a dpo / orpo run: its loss is per pair, not per token
    if loop.eval_loss is not None:
        before = f" (before training {loop.eval_loss_before:.4f})" if loop.eval_loss_before is not None else ""
        perplexity = "" if pairs else f", perplexity {math.exp(min(loop.eval_loss, 700)):.2f}"
        lines.append(f"  final eval loss  {loop.eval_loss:.4f}{perplexity}{before}")
    if pairs:
        held_out = readings.get("eval_rewards/accuracy")
        lines.append(
            f"  rewards          accuracy {readings['rewards/accuracy']:.1%}, margin {readings['rewards/margin']:.4f}"
            + (f" (eval accuracy {held_out:.1%})" if held_out is not None else "")
        )
        held_out = readings.get("eval_logps/accuracy")
        lines.append(
            f"  preferred        chosen more likely than rejected on {readings['logps/accuracy']:.1%} of the last "
            "step's pairs" + (f", {held_out:.1%} held out" if held_out is not None else "")
        )
    if result.exact_match_after is not None:
        lines.append(
            f"  exact match      {100 * result.exact_match_before.score:.1f}% -> "
            f"{100 * result.exact_match_after.score:.1f}%"
        )
    lines.append(f"  trainable        {result.trainable_parameters:,} parameters")
    lines.append(f"  adapter          {result.adapter_path} ({format_bytes(result.adapter_bytes)})")
    return "\n".join(lines)
