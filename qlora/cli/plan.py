"""`qlora plan`: parse, plan (qlora.plan.memory does the arithmetic), print the breakdown or JSON.
A dpo / orpo job is planned in pairs (two sequences each; DPO with its reference forward)."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from typing import Optional

from qlora.cli.commands import command_parser
from qlora.plan.memory import Plan, seconds_per_token
from qlora.sizes import format_bytes


def add_plan_command(commands) -> None:
    plan = command_parser(
        commands, "plan", "peak GPU memory and speed of a job from the model's config.json alone (no weights, no GPU)"
    )
    plan.add_argument(
        "config",
        help="job YAML, model folder, shipped architecture (e.g. llama-3.1-8b) or a hub id shipped in configs/arch",
    )
    budget = plan.add_mutually_exclusive_group()
    budget.add_argument("--gpu-memory", metavar="SIZE", help="memory to fit in, e.g. 24GiB or 80GB")
    budget.add_argument(
        "--gpu",
        metavar="NAME",
        help="a GPU from configs/hardware/gpus.yaml (4090, A100-40, A100-80, H100, L40S, ...): its memory and speed",
    )
    plan.add_argument(
        "--gpus",
        metavar="N",
        help="GPUs the job runs on (torchrun --nproc-per-node x nodes; default 1): every number is then per GPU",
    )
    plan.add_argument(
        "--strategy",
        metavar="ddp|fsdp",
        help="how N GPUs share the job, overriding train.distributed: ddp replicates the base, fsdp shards it",
    )
    plan.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    plan.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a job key, e.g. --set data.max_seq_len=4096 (repeatable)",
    )
    plan.add_argument(
        "--mfu",
        type=float,
        default=0.4,
        help="utilization of the GPU's peak bf16 FLOP/s for the time estimate (default 0.4)",
    )
    plan.add_argument("--epoch-tokens", type=int, help="tokens in one epoch, for the time per epoch")


def run_plan(args: argparse.Namespace) -> int:
    """`qlora plan`: a job file, or a bare model with the job defaults (and --set overrides)."""
    from qlora.config import apply_override, load_config, validate
    from qlora.errors import ConfigError
    from qlora.plan.architecture import load_architecture
    from qlora.plan.hardware import find_gpu
    from qlora.plan.memory import make_plan, seconds_per_token
    from qlora.plan.settings import settings_from_job
    from qlora.sizes import parse_bytes

    world_size = gpu_count(args.gpus)
    # --strategy is train.distributed set last: the schema's rules for it (its values, no fsdp
    # with an 8-bit base) are checked in one place.
    overrides = args.overrides + ([f"train.distributed={args.strategy}"] if args.strategy else [])
    try:
        if args.config.endswith((".yaml", ".yml")):
            config = load_config(args.config, overrides)
        else:
            raw = {
                "model": {"name_or_path": args.config},
                "data": {"train": "unused.jsonl"},
                "output": {"dir": "unused"},
            }
            for override in overrides:
                apply_override(raw, override)
            config = validate(raw, source=args.config)
    except ConfigError as error:
        if args.strategy and "train.distributed" in str(error):
            raise ConfigError(f"--strategy {args.strategy}: {error}") from None
        raise
    gpu = find_gpu(args.gpu) if args.gpu else None
    try:
        budget = gpu.memory_bytes if gpu else parse_bytes(args.gpu_memory) if args.gpu_memory else None
    except ValueError as error:
        raise ConfigError(f"--gpu-memory: {error}") from None
    # micro_batch_size auto is planned at 1; the suggestions say how far it goes.
    settings = settings_from_job(config)
    if world_size is not None:
        settings = replace(settings, world_size=world_size)
    arch = load_architecture(config.model.name_or_path, config.model.trust_remote_code)
    choice = auto_checkpointing(config, arch, settings, budget, gpu.name if gpu else f"--gpu-memory {args.gpu_memory}")
    if choice:
        settings = replace(settings, gradient_checkpointing=choice.mode)
    plan = make_plan(arch, settings, budget)
    if args.json:
        record = plan.to_json()
        record["gradient_checkpointing_auto"] = choice.to_json() if choice else None
        record["gpu"] = gpu.name if gpu else None
        if gpu:
            # All N GPUs together: each runs the same FLOPs per token at the stated utilization.
            record["tokens_per_s"] = plan.settings["world_size"] / seconds_per_token(
                plan.flops_per_token, gpu.bf16_tflops, args.mfu
            )
            record["utilization"] = args.mfu
            record["epoch_seconds"] = args.epoch_tokens / record["tokens_per_s"] if args.epoch_tokens else None
        print(json.dumps(record))
    else:
        text = describe_plan(
            plan, gpu.name if gpu else None, gpu.bf16_tflops if gpu else None, args.mfu, args.epoch_tokens, choice
        ).splitlines()
        if choice:
            text.insert(2, f"  {choice.line()}")  # under the settings line it decided
        print("\n".join(text))
    return 0


def auto_checkpointing(config, arch, settings, budget: Optional[int], budget_source: str):
    """gradient_checkpointing auto as the job would choose it, for the card the plan is asked about
    (--gpu, --gpu-memory), else train.memory_budget; never this machine's memory: a plan is for a
    card, answered anywhere. None when the job names a mode."""
    from qlora.plan.budget import MemoryBudget, read_budget
    from qlora.plan.checkpointing_mode import AUTO, choose_checkpointing

    if config.train.gradient_checkpointing != AUTO:
        return None
    if budget is not None:
        known = MemoryBudget(budget, budget_source)
    elif config.train.memory_budget is not None:
        known = read_budget(config.train.memory_budget)
    else:
        known = None
    return choose_checkpointing(arch, settings, known)


def gpu_count(text: Optional[str]) -> Optional[int]:
    from qlora.errors import ConfigError

    if text is None:
        return None
    if not text.strip().isdigit() or int(text) < 1:
        raise ConfigError(f"--gpus: a whole number of GPUs, 1 or more (got {text!r})")
    return int(text)


def describe_plan(
    plan: Plan,
    gpu_name: Optional[str] = None,
    tflops: Optional[float] = None,
    utilization: float = 0.4,
    epoch_tokens: Optional[int] = None,
    auto=None,
) -> str:
    """The breakdown as text; `auto`: gradient_checkpointing auto's choice, when it chose the mode."""
    settings = plan.settings
    lines = [
        f"plan for {plan.architecture}: {plan.parameters['total'] / 1e9:.2f}B params "
        f"({plan.parameters['quantized'] / 1e9:.2f}B quantized, {plan.parameters['lora'] / 1e6:.1f}M LoRA)",
        f"  micro_batch {settings['micro_batch']}{rows_shape(settings)} x seq_len {settings['seq_len']}, checkpointing "
        f"{checkpointing_word(settings['gradient_checkpointing'])}, {settings['bits'] or 16}-bit base, "
        f"compute {settings['compute_dtype']}, optimizer {settings['optimizer']}",
    ]
    if settings["sequences_per_row"] > 1:
        lines.append(preference_line(settings))
    if settings["world_size"] > 1:
        lines.append(
            f"  on {settings['world_size']} GPUs with {settings['strategy']}: every number below is ONE GPU's "
            f"(each rank runs its own micro_batch {settings['micro_batch']})"
        )
    lines.append("")
    for line in plan.lines:
        mark = " " if line.counted else "-"
        lines.append(f" {mark}{line.name:<20} {format_bytes(line.bytes):>10}  {line.why}")
    lines += [
        "",
        f"  peak allocated {format_bytes(plan.allocated_bytes)} (torch.cuda.max_memory_allocated), "
        f"reserved {format_bytes(plan.reserved_bytes)}, "
        f"total on the card {format_bytes(plan.total_bytes)} ({plan.total_bytes / 1e9:.1f} GB)",
    ]
    if plan.budget_bytes is not None:
        lines += fit_lines(plan, gpu_name, auto)
    per_token = plan.flops_per_token
    # A demo-sized model does well under a GFLOP a token: "0.0 GFLOP" would say nothing.
    compute = f"{per_token / 1e9:.1f} GFLOP" if per_token >= 1e8 else f"{per_token / 1e6:.2f} MFLOP"
    counted = (
        " (both sequences of a pair" + (", and the reference forward" if settings["reference_forward"] else "") + ")"
        if settings["sequences_per_row"] > 1
        else ""
    )
    lines.append(f"  compute: {compute} per training token{counted}")
    if tflops:
        lines.append(time_line(plan.flops_per_token, tflops, utilization, epoch_tokens, settings["world_size"]))
    return "\n".join(lines)


def fit_lines(plan: Plan, gpu_name: Optional[str], auto=None) -> list[str]:
    """The verdict against the budget, then how far the shape and checkpointing can move."""
    settings = plan.settings
    verdict = "FITS" if plan.fits else "DOES NOT FIT"
    per_gpu = f" per GPU x {settings['world_size']}" if settings["world_size"] > 1 else ""
    lines = [f"  {verdict} in {format_bytes(plan.budget_bytes)}{per_gpu}{f' ({gpu_name})' if gpu_name else ''}"]
    tips = plan.suggestions
    if not tips:
        return lines
    if not plan.fits:
        lines.append(more_gpus_line(plan, tips.get("fits_on_gpus")))
    lines.append(
        f"  largest micro_batch at seq_len {settings['seq_len']}: {tips['largest_micro_batch']}{rows_unit(settings)}"
        f"; largest seq_len at micro_batch {settings['micro_batch']}: {tips['largest_seq_len']}"
    )
    if tips["fits_without_checkpointing"]:
        lines.append(
            f"  gradient checkpointing is not needed here (fits without it up to micro_batch "
            f"{tips['largest_micro_batch_without_checkpointing']}; ~30% less compute)"
        )
    else:
        lines.append("  gradient checkpointing is needed: without it this does not fit")
        if tips.get("fits_with_selective_checkpointing") and settings["gradient_checkpointing"] is True:
            lines.append(
                "  train.gradient_checkpointing: selective fits too (skips recomputing the 4-bit matmuls: less compute)"
                + (", but not within the headroom auto keeps spare: set it to take it" if auto else "")
            )
    return lines


def more_gpus_line(plan: Plan, found: Optional[dict]) -> str:
    """When the job does not fit as planned: the fewest GPUs (and strategy) it fits on."""
    settings = plan.settings
    budget = format_bytes(plan.budget_bytes)
    now = (
        f"does not fit one {budget} GPU"
        if settings["world_size"] == 1
        else f"does not fit {settings['world_size']} x {budget} GPUs with {settings['strategy']}"
    )
    if found is None:
        return f"  {now}; no count of GPUs `qlora plan` tries (up to 64) fits it with ddp or fsdp"
    return (
        f"  {now}; fits {found['gpus']} with --strategy {found['strategy']}: "
        f"{format_bytes(found['per_gpu_bytes'])} per GPU"
    )


def time_line(
    flops_per_token: float, tflops: float, utilization: float, epoch_tokens: Optional[int], world_size: int
) -> str:
    # N GPUs each at the stated utilization; communication is inside that utilization, not modelled.
    per_token = seconds_per_token(flops_per_token, tflops, utilization) / world_size
    gpus = f" x {world_size} GPUs" if world_size > 1 else ""
    return (
        f"  time at {utilization:.0%} of {tflops:g} TFLOP/s{gpus}: {1 / per_token:,.0f} tokens/s, "
        f"{per_token * 1e6 / 3600:.2f} h per million tokens"
        + (f", {per_token * epoch_tokens / 3600:.2f} h per epoch of {epoch_tokens:,} tokens" if epoch_tokens else "")
    )


def rows_unit(settings: dict) -> str:
    """What micro_batch counts, when not plain sequences."""
    return " pairs" if settings["sequences_per_row"] > 1 else ""


def rows_shape(settings: dict) -> str:
    if settings["sequences_per_row"] == 1:
        return ""
    pairs = " pair" if settings["micro_batch"] == 1 else " pairs"
    return f"{pairs} ({settings['micro_batch'] * settings['sequences_per_row']} sequences)"


def preference_line(settings: dict) -> str:
    """What a preference plan assumed: two sequences per pair, and DPO's reference pass or none."""
    reference = (
        "+ a reference forward per micro-batch (the adapter off, no_grad): its FLOPs in compute, its peak as "
        "the reference_forward phase"
        if settings["reference_forward"]
        else "no reference pass"
    )
    return (
        f"  preference pairs: each is its chosen and rejected sequence (up to seq_len each) in one padding-free "
        f"forward, so activations and logits are {settings['sequences_per_row']} x micro_batch sequences'; {reference}"
    )


def checkpointing_word(mode) -> str:
    return "selective" if mode == "selective" else ("on" if mode else "off")
