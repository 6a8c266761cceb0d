"""Our trainer vs TRL SFTTrainer + PEFT, same fixture, same settings, in ONE invocation.

    python bench/compare.py                       # CPU: ~25M Llama, 3 runs, a few minutes
    python bench/compare.py --steps 40 --runs ours trl-best

Builds (or reuses) the fixture in --work: a ~25M-parameter random-init Llama saved as an HF
folder with a byte-level tokenizer, and chat rows of ~50 to ~470 tokens (bench/fixture.py).
Then each run trains in its OWN subprocess (so peak RSS / peak GPU memory is per run):

  ours         qlora's job runner (python -m qlora.cli train's code path), data.padding_free: true (the
               default), train.gradient_checkpointing: selective (keeps the 4-bit matmuls' outputs)
  ours-full-checkpointing  the same with full gradient checkpointing, as every TRL run
  ours-padded  full checkpointing and padded micro-batches (data.padding_free: false)
  trl-default  SFTTrainer + PEFT with its defaults (padded batches, adapters cast to bf16)
  trl-best     SFTTrainer + PEFT, padding-free, adapters kept in float32

Shared by every run: NF4 + double quant, compute dtype (float32 on CPU), LoRA r/alpha/dropout on
all linear layers, AdamW (torch), lr, cosine schedule, warmup, grad-norm clip 1.0, gradient
checkpointing (non-reentrant; ours: selective, which TRL does not offer), max_seq_len, effective
batch in rows, optimizer steps, seed, completion-only loss, the same held-out rows for the eval
loss (measured by the same function for all runs, after training). Prints one JSON line per run,
then one ratio line.
Needs `pip install .[bench]` (trl).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RUNS = ("ours", "ours-full-checkpointing", "ours-padded", "trl-default", "trl-best")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    parser.add_argument(
        "--work",
        default=os.path.join(tempfile.gettempdir(), "qlora-bench-compare"),
        help="fixture folder (reused when its settings match)",
    )
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps")
    parser.add_argument("--batch", type=int, default=8, help="effective batch in rows")
    parser.add_argument("--micro-batch", type=int, default=4, help="rows per forward pass")
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--train-rows", type=int, default=600)
    parser.add_argument("--eval-rows", type=int, default=48)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-alpha", type=float, default=32)
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument(
        "--compute-dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="default: float32 on CPU, bfloat16 on CUDA",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--arch",
        help="a configs/arch name (e.g. llama-3.1-8b): the fixture model takes its shape, vocabulary and head, "
        "random weights (bench/gpu_proof.sh); default: the small bench shape (bench/fixture.py MODEL_SHAPE)",
    )
    parser.add_argument("--one", choices=RUNS, help=argparse.SUPPRESS)  # internal: one run in this process
    args = parser.parse_args(argv)
    if args.batch % args.micro_batch:
        parser.error(f"--batch {args.batch} is not a multiple of --micro-batch {args.micro_batch}")
    return args


def settings_of(args: argparse.Namespace) -> dict:
    import torch

    dtype = args.compute_dtype or ("bfloat16" if torch.cuda.is_available() else "float32")
    return {
        "steps": args.steps,
        "batch": args.batch,
        "micro_batch": args.micro_batch,
        "max_seq_len": args.max_seq_len,
        "learning_rate": args.learning_rate,
        "warmup_steps": args.warmup_steps,
        "lora_r": args.lora_r,
        "lora_alpha": args.lora_alpha,
        "lora_dropout": args.lora_dropout,
        "compute_dtype": dtype,
        "seed": args.seed,
        "model_shape": args.arch or "bench/fixture.py MODEL_SHAPE",  # labels every run's line
    }


def fixture_of(args: argparse.Namespace) -> dict:
    """The fixture in args.work, built once and reused while its recipe is unchanged."""
    from bench.fixture import MODEL_SHAPE, build_fixture

    work = Path(args.work)
    recipe = {
        "shape": args.arch or MODEL_SHAPE,
        "train_rows": args.train_rows,
        "eval_rows": args.eval_rows,
        "seed": args.seed,
        "max_seq_len": args.max_seq_len,
        "version": 1,
    }
    stamp = work / "fixture.json"
    if stamp.is_file():
        saved = json.loads(stamp.read_text())
        if saved.get("recipe") == recipe:
            return saved["fixture"]
    fixture = build_fixture(
        work, args.train_rows, args.eval_rows, seed=args.seed, max_seq_len=args.max_seq_len, arch=args.arch
    )
    stamp.write_text(json.dumps({"recipe": recipe, "fixture": fixture}))
    return fixture


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one, settings_of(args), fixture_of(args))), flush=True)
        return 0
    fixture = fixture_of(args)
    print(f"fixture: {fixture['parameters']:,}-parameter Llama in {fixture['model']}", file=sys.stderr)
    records, status = {}, 0
    for run in args.runs:
        command = [sys.executable, __file__, "--one", run] + [item for item in (sys.argv[1:] if argv is None else argv)]
        started = time.perf_counter()
        result = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
        record = json.loads(lines[-1]) if lines else {"run": run, "error": f"exit code {result.returncode}"}
        record["wall_s"] = round(time.perf_counter() - started, 2)
        records[run] = record
        print(json.dumps(record), file=sys.stderr, flush=True)  # progress; the final lines go to stdout
        status = status or result.returncode
    add_peer_mfu(records)
    for record in records.values():
        print(json.dumps(record), flush=True)
    print(json.dumps(ratios(records)), flush=True)
    return status


def ratios(records: dict) -> dict:
    """ours / peer for tokens/s, peak memory and eval loss (the targets: >= 2.0x / 1.3x speed,
    <= 1.0x memory, eval loss within 2%)."""
    line = {"ratios": "ours / peer"}
    ours = records.get("ours", {})
    for peer in ("ours-full-checkpointing", "ours-padded", "trl-default", "trl-best"):
        other = records.get(peer, {})
        if "error" in ours or "error" in other or not ours or not other:
            continue
        line[peer] = {
            "supervised_tokens_per_s": round(ours["supervised_tokens_per_s"] / other["supervised_tokens_per_s"], 3),
            "peak_memory": round(ours["peak_memory_bytes"] / other["peak_memory_bytes"], 3),
            "eval_loss": round(ours["eval_loss"] / other["eval_loss"], 4),
        }
    return line


def add_peer_mfu(records: dict) -> None:
    """MFU of a run that is not ours: our run's useful FLOPs per supervised token (qlora/plan/flops.py,
    same rows' length mix) x its supervised tokens/s, over the same measured peak."""
    ours = records.get("ours") or records.get("ours-padded") or {}
    if not ours.get("useful_flops"):
        return
    per_token = ours["useful_flops"] / ours["supervised_tokens"]
    for record in records.values():
        if "error" not in record and "mfu" not in record:
            record["mfu_estimated"] = round(per_token * record["supervised_tokens_per_s"] / ours["peak_flops_per_s"], 5)


def run_one(run: str, settings: dict, fixture: dict) -> dict:
    """Train one run in this process and return its JSON record."""
    import torch

    started = time.perf_counter()
    if run.startswith("ours"):
        record = run_ours(
            settings, fixture, padding_free=run != "ours-padded", checkpointing="selective" if run == "ours" else True
        )
    else:
        from bench.peer_trl import run_trl

        result = run_trl(settings, fixture, mode=run.removeprefix("trl-"))
        model, tokenizer = result.pop("model"), result.pop("tokenizer")
        record = {**result, "eval_loss": held_out_loss(model, tokenizer, settings, fixture)}
    on_cuda = torch.cuda.is_available()
    from qlora.plan.peak_flops import peak_matmul_flops

    device = torch.device("cuda" if on_cuda else "cpu")
    record["peak_matmul_flops_per_s"] = {
        dtype: peak_matmul_flops(device, dtype)["flops_per_s"] for dtype in ("float32", "bfloat16")
    }
    record.update(
        run=run,
        device=torch.cuda.get_device_name()
        if on_cuda
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        supervised_tokens_per_s=round(record["supervised_tokens"] / record["train_s"], 1),
        peak_memory_kind="gpu_allocated" if on_cuda else "process_rss",
        process_s=round(time.perf_counter() - started, 2),
        settings=settings,
    )
    return {key: round(value, 4) if isinstance(value, float) else value for key, value in record.items()}


def run_ours(settings: dict, fixture: dict, padding_free: bool, checkpointing) -> dict:
    """The qlora job runner (the CLI's code path) on a job file with the shared settings.
    `checkpointing`: True (full, as TRL) or "selective" (qlora.model.checkpointing)."""
    import yaml

    from qlora.config import load_config
    from qlora.job.run import run_job
    from qlora.training.metrics import peak_memory

    folder = Path(tempfile.mkdtemp(prefix="bench-ours-"))
    job = ours_job(settings, fixture, padding_free, checkpointing, folder / "out")
    (folder / "job.yaml").write_text(yaml.safe_dump(job))
    result = run_job(load_config(folder / "job.yaml"), echo=lambda line: print(line, file=sys.stderr))
    peak = peak_memory()[1]  # before the eval below loads a second base
    model, tokenizer = load_trained_adapter(settings, fixture, folder / "out")
    loop = result.loop
    steps = [json.loads(line) for line in (folder / "out" / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in steps if "loss" in row]
    return {
        "train_s": loop.seconds,
        "supervised_tokens": loop.supervised_tokens,
        "tokens": loop.tokens,
        "final_train_loss": loop.final_loss,
        "train_loss_last5": sum(losses[-5:]) / len(losses[-5:]),
        "eval_loss": held_out_loss(model, tokenizer, settings, fixture),
        "adapter_dtype": "float32",
        "peak_memory_bytes": peak,
        "useful_flops": loop.useful_flops,
        "mfu": round(loop.mfu, 5),
        "peak_flops_per_s": loop.peak_flops_per_s,
    }


def ours_job(settings: dict, fixture: dict, padding_free: bool, checkpointing, output_dir: Path) -> dict:
    """The job file's content: the shared settings in qlora's schema."""
    return {
        "model": {"name_or_path": fixture["model"]},
        "quantization": {
            "bits": 4,
            "quant_type": "nf4",
            "double_quant": True,
            "compute_dtype": settings["compute_dtype"],
        },
        "lora": {
            "r": settings["lora_r"],
            "alpha": settings["lora_alpha"],
            "dropout": settings["lora_dropout"],
            "target_modules": "all-linear",
        },
        # No eval data in the job: the loop would time its final eval; the eval loss is measured
        # after training, by held_out_loss, as for the TRL runs.
        "data": {
            "train": fixture["train"],
            "format": "chat",
            "max_seq_len": settings["max_seq_len"],
            "train_on": "completions",
            "too_long": "drop",
            "padding_free": padding_free,
        },
        "train": {
            "max_steps": settings["steps"],
            "micro_batch_size": settings["micro_batch"],
            "grad_accum_steps": settings["batch"] // settings["micro_batch"],
            "learning_rate": settings["learning_rate"],
            "lr_schedule": "cosine",
            "warmup_steps": settings["warmup_steps"],
            "optimizer": "adamw",
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
            "gradient_checkpointing": checkpointing,
            "seed": settings["seed"],
            "log_every": 1,
        },
        "output": {"dir": str(output_dir)},
    }


def load_trained_adapter(settings: dict, fixture: dict, adapter_dir: Path):
    """(model, tokenizer): the trained adapter as written, on a freshly loaded base, so what is
    evaluated is the artifact users get."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from qlora.config import ModelSection, QuantizationSection
    from qlora.model.base import load_base

    tokenizer = AutoTokenizer.from_pretrained(fixture["model"])
    quantization = QuantizationSection(compute_dtype=settings["compute_dtype"])
    base = load_base(ModelSection(name_or_path=fixture["model"]), quantization, gradient_checkpointing=False)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    return model, tokenizer


def held_out_loss(model, tokenizer, settings: dict, fixture: dict) -> float:
    """Mean loss per supervised token on the held-out rows, by the function our loop uses."""
    import torch

    from qlora import data
    from qlora.training.loop import evaluate

    rows = data.read_rows([(fixture["eval"], "chat")], key="data.eval")
    examples = data.tokenize_rows(rows, tokenizer, settings["max_seq_len"], "completions", "drop").examples
    batches = data.epoch_batches(
        examples,
        settings["micro_batch"],
        packing=False,
        max_seq_len=settings["max_seq_len"],
        pad_id=tokenizer.pad_token_id,
        seed=settings["seed"],
        epoch=0,
        shuffle=False,
    )
    return evaluate(model, batches, torch.device("cuda" if torch.cuda.is_available() else "cpu"))


if __name__ == "__main__":
    sys.exit(main())
