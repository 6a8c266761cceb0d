"""Our trainer vs TRL SFTTrainer + PEFT, the default config on realistic shapes, in ONE invocation.

    python bench/compare.py                                   # CPU: 9 runs + evals, ~12 min on 2 cores
    python bench/compare.py --runs ours trl-best --models tied --steps 4
    python bench/compare.py --arch llama-3.1-8b --runs ours trl-default trl-best   # GPU (bench/gpu_proof.sh)

A run is RUN@MODEL. MODELs (bench/fixture.py, built once in --work and reused):
  tied, untied  a 24-layer, 32,000-vocabulary scaled copy of configs/arch/llama-2-7b, random init,
                114M parameters with a tied head, 132M untied
  byte          the same body with the 260-entry byte vocabulary (an extra row: the vocabulary's cost)
  --arch NAME   a random copy of configs/arch/NAME instead (every run on it)
RUNs (bench/compare_runs.py, bench/peer_trl.py):
  ours          qlora's job runner with the project's defaults (compute bfloat16, gradient_checkpointing
                auto, train_on completions, padding-free micro-batches)
  ours-float32  the same in compute float32 (an extra row)
  ours-packing  the same with data.packing: true, one epoch of the same rows (fewer, fuller steps)
  ours-selective, ours-full-checkpointing, ours-padded   one default changed each (not in the default list)
  trl-default   SFTTrainer + PEFT with its defaults (bf16 mixed precision, gradient checkpointing,
                padded batches, adapters cast to bf16)
  trl-best      SFTTrainer + PEFT, padding-free, adapters kept in float32
Shared by every run: the rows (every one fits max_seq_len), NF4 + double quant, LoRA r/alpha/dropout
on all linear layers, torch AdamW, lr, cosine schedule, warmup, clip 1.0, micro-batch, effective
batch, optimizer steps, seed, loss on the answers only.

Each run trains in its OWN process; its wall time (start to exit: imports, load, training, the
adapter written) and peak RSS (the child's ru_maxrss from wait4) are measured from outside, the
same way for every run. Then every adapter's eval loss is measured by one function
(compare_runs.held_out_loss) on one freshly loaded base per model, in processes of their own.
Prints one JSON line per run and one ratio line per model (and per other run of ours in the
invocation: that one against the peer's runs). Needs `pip install .[bench]` (trl).

--objective dpo: the same machinery for preference tuning (BENCHMARKS.md "DPO: ours vs TRL
DPOTrainer + PEFT"), ~4 min on 2 idle CPU cores with its defaults (DPO_DEFAULTS):
    python bench/compare.py --objective dpo
  rows          the chat rows as preference pairs (bench/fixture.py preference_rows): the capitals
                chosen, the words as given rejected
  ours          the job runner with train.objective dpo, data.format preference (reference: the base
                with the adapter disabled)
  ours-full-checkpointing   (--runs) the same, checkpointing every layer as trl-default does
  trl-default   DPOTrainer + PEFT with DPOConfig's defaults, ref_model None (so its reference is
                the adapter disabled too); TRL 1.16's DPO has no padding-free path, so no trl-best
  shared too    beta; LoRA dropout 0 (DPOConfig disables dropout by default); lr 1e-4
  eval          every adapter's held-out DPO loss, preference accuracy and reward margin, by one
                function (compare_runs.held_out_preference)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.compare_runs import OURS_RUNS, TRL_RUNS, compute_dtype_of  # noqa: E402

RUNS = tuple(OURS_RUNS) + TRL_RUNS
DPO_RUNS = ("ours", "ours-float32", "ours-full-checkpointing", "trl-default")  # the runs a dpo comparison has
MODELS = ("tied", "untied", "byte")
DEFAULT_RUNS = (
    "ours@tied",
    "trl-default@tied",
    "trl-best@tied",
    "ours@untied",
    "trl-default@untied",
    "trl-best@untied",
    "ours-float32@tied",  # extra rows, labelled by their run and model
    "ours@byte",
    "ours-packing@tied",
)
DEFAULT_DPO_RUNS = ("ours@tied", "trl-default@tied", "ours@untied", "trl-default@untied")
# --objective dpo's defaults where they differ: a pair is two sequences and a reference forward,
# so fewer, shorter rows keep the invocation ~4 min on 2 CPU cores; dropout off as DPOConfig has
# it; a lower rate, as DPO takes, which also keeps the held-out loss off 0 (at 1e-3 two steps
# already prefer every held-out pair: nothing left to compare).
DPO_DEFAULTS = dict(
    steps=8, batch=4, micro_batch=2, max_seq_len=128, max_words=16, eval_rows=16, lora_dropout=0.0, learning_rate=1e-4
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--objective",
        choices=["sft", "dpo"],
        default="sft",
        help=f"sft: ours vs SFTTrainer; dpo: ours vs DPOTrainer on preference pairs (defaults: {DPO_DEFAULTS})",
    )
    parser.add_argument(
        "--runs",
        nargs="+",
        help=f"RUN or RUN@MODEL; RUN: {', '.join(RUNS)}; MODEL: {', '.join(MODELS)}; a bare RUN runs on every "
        f"--models model (default: {' '.join(DEFAULT_RUNS)})",
    )
    parser.add_argument("--models", nargs="+", choices=MODELS, default=["tied", "untied"], help="for bare RUNs")
    parser.add_argument(
        "--work",
        default=os.path.join(tempfile.gettempdir(), "qlora-bench-compare"),
        help="fixture folder (reused when its settings match)",
    )
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps")
    parser.add_argument("--batch", type=int, default=8, help="effective batch in rows")
    parser.add_argument("--micro-batch", type=int, default=4, help="rows per forward pass")
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--train-rows", type=int, help="default: steps x batch (one epoch, as packing takes)")
    parser.add_argument("--eval-rows", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    # 0: ours and transformers then give every step the same rate (with warmup, transformers' first
    # step has rate 0, ours 1/(warmup + 1) of the peak), so the eval losses compare one optimization.
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-alpha", type=float, default=32)
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument(
        "--compute-dtype", choices=["float32", "bfloat16"], help="every run's; default: the project's default"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-words", type=int, default=32, help="the longest row's word count (bench/fixture.py)")
    parser.add_argument("--dpo-beta", type=float, help="dpo: every run's beta; default: the project's default")
    parser.add_argument(
        "--arch",
        help="a configs/arch name (e.g. llama-3.1-8b): every run on a random copy of it (its shape, vocabulary "
        "and head; bench/gpu_proof.sh) instead of the fixture's models",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: train RUN@MODEL in this process
    parser.add_argument("--adapter-dir", help=argparse.SUPPRESS)  # internal: where --one writes its adapter
    parser.add_argument("--eval", nargs="+", help=argparse.SUPPRESS)  # internal: MODEL DTYPE ADAPTER_DIR...
    if parser.parse_known_args(argv)[0].objective == "dpo":
        parser.set_defaults(**DPO_DEFAULTS)
    args = parser.parse_args(argv)
    if args.batch % args.micro_batch:
        parser.error(f"--batch {args.batch} is not a multiple of --micro-batch {args.micro_batch}")
    args.train_rows = args.train_rows or args.steps * args.batch
    try:
        args.plan = run_plan(args)
    except ValueError as error:
        parser.error(str(error))
    return args


def run_plan(args: argparse.Namespace) -> list[tuple[str, str]]:
    """[(run, model)] in the order they run."""
    dpo = args.objective == "dpo"
    runs = DPO_RUNS if dpo else RUNS
    if args.arch:
        words = args.runs or [run for run in ("ours", "trl-default", "trl-best") if run in runs]
    else:
        words = args.runs or (DEFAULT_DPO_RUNS if dpo else DEFAULT_RUNS)
    plan = []
    for word in words:
        run, _, model = word.partition("@")
        if run not in runs:
            raise ValueError(f"--runs {word}: {run} is not one of {', '.join(runs)} (--objective {args.objective})")
        if args.arch and model:
            raise ValueError(f"--runs {word}: with --arch every run is on {args.arch}; drop @{model}")
        if model and model not in MODELS:
            raise ValueError(f"--runs {word}: {model} is not one of {', '.join(MODELS)}")
        models = [args.arch] if args.arch else [model] if model else args.models
        plan += [(run, name) for name in models if (run, name) not in plan]
    return plan


def settings_of(args: argparse.Namespace) -> dict:
    from qlora.config import QuantizationSection, TrainSection

    return {
        "objective": args.objective,
        # The project's default, read from the schema (TRL's default is the same 0.1).
        "dpo_beta": args.dpo_beta or TrainSection.model_fields["dpo_beta"].default,
        "steps": args.steps,
        "batch": args.batch,
        "micro_batch": args.micro_batch,
        "max_seq_len": args.max_seq_len,
        "train_rows": args.train_rows,
        "learning_rate": args.learning_rate,
        "warmup_steps": args.warmup_steps,
        "lora_r": args.lora_r,
        "lora_alpha": args.lora_alpha,
        "lora_dropout": args.lora_dropout,
        # The project's default, read from the schema: no default is written in two places.
        "compute_dtype": args.compute_dtype or QuantizationSection().compute_dtype,
        "seed": args.seed,
    }


def fixture_of(args: argparse.Namespace, model: str) -> dict:
    """{model, train, eval, parameters} for `model`: the model and the rows each built once in
    args.work and reused while their recipe is unchanged. The rows are shared by every model:
    every fixture tokenizer is byte-level."""
    from bench import fixture as builder

    work = Path(args.work)
    data_recipe = {
        "rows": [args.train_rows, args.eval_rows],
        "seed": args.seed,
        "max_seq_len": args.max_seq_len,
        "max_words": args.max_words,
    }
    sizes = dict(train_rows=args.train_rows, eval_rows=args.eval_rows, seed=args.seed, max_seq_len=args.max_seq_len)
    # SFT's chat rows and DPO's pairs each have their own stamp, so one --work serves both.
    data_stamp = work / ("pairs.json" if args.objective == "dpo" else "data.json")
    if not (data_stamp.is_file() and json.loads(data_stamp.read_text())["recipe"] == data_recipe):
        build = builder.build_pairs if args.objective == "dpo" else builder.build_data
        rows = build(work, **sizes, max_words=args.max_words)
        data_stamp.write_text(json.dumps({"recipe": data_recipe, "rows": rows}))
    rows = json.loads(data_stamp.read_text())["rows"]
    shape = builder.REALISTIC_SHAPE if model in MODELS else "configs/arch"
    recipe = {"model": model, "shape": shape, "seed": args.seed, "max_seq_len": args.max_seq_len, "version": 2}
    stamp = work / model / "fixture.json"
    if not (stamp.is_file() and json.loads(stamp.read_text())["recipe"] == recipe):
        shutil.rmtree(work / model, ignore_errors=True)
        build = builder.build_variant if model in MODELS else builder.build_arch_model
        model_dir = build(work / model / "model", model, seed=args.seed, max_seq_len=args.max_seq_len)
        built = {"model": str(model_dir), "parameters": builder.parameter_count(model_dir)}
        stamp.write_text(json.dumps({"recipe": recipe, "fixture": built}))
    return {**json.loads(stamp.read_text())["fixture"], **rows}


def main(argv=None) -> int:
    args = parse_args(argv)
    forwarded = list(sys.argv[1:] if argv is None else argv)
    settings = settings_of(args)
    if args.one:
        from bench.compare_runs import run_one

        run, _, model = args.one.partition("@")
        record = run_one(run, settings, fixture_of(args, model), Path(args.adapter_dir))
        print(json.dumps(record), flush=True)
        return 0
    if args.eval:
        from bench.compare_runs import evaluate_adapters

        model, dtype, *adapters = args.eval
        print(json.dumps(evaluate_adapters(settings, fixture_of(args, model), dtype, adapters)), flush=True)
        return 0
    fixtures = {model: fixture_of(args, model) for model in dict.fromkeys(model for _, model in args.plan)}
    for model, fixture in fixtures.items():
        print(f"fixture {model}: {fixture['parameters']:,} parameters in {fixture['model']}", file=sys.stderr)
    records, status = [], 0
    for run, model in args.plan:
        adapter_dir = Path(args.work) / "runs" / f"{run}@{model}"
        shutil.rmtree(adapter_dir, ignore_errors=True)
        command = ["--one", f"{run}@{model}", "--adapter-dir", str(adapter_dir)]
        record, returncode = measured_child(command + forwarded)
        record = {"run": run, "model": model, **record, "adapter_dir": str(adapter_dir)}
        record["settings"] = {**settings, "compute_dtype": compute_dtype_of(run, settings), "model": model}
        records.append(record)
        print(json.dumps(record), file=sys.stderr, flush=True)  # progress; the final lines go to stdout
        status = status or returncode
    status = add_eval_losses(records, forwarded) or status
    for model in fixtures:
        add_peer_mfu([record for record in records if record["model"] == model])
    for record in records:
        print(json.dumps(record), flush=True)
    for model in fixtures:
        mine = [record for record in records if record["model"] == model]
        print(json.dumps(ratios(model, mine)), flush=True)
        for variant in dict.fromkeys(r["run"] for r in mine if r["run"] in OURS_RUNS and r["run"] != "ours"):
            print(json.dumps(ratios(model, mine, variant)), flush=True)  # mode for mode against the peer
    return status


def measured_child(arguments: list) -> tuple[dict, int]:
    """(the child's last JSON line + wall_s + process_peak_rss_bytes, exit code): this script
    with `arguments` in a child process, timed from spawn to exit; its peak RSS from wait4 (the
    child's own ru_maxrss, as /usr/bin/time reports it)."""
    with tempfile.TemporaryFile("w+") as captured:
        started = time.perf_counter()
        child = subprocess.Popen(
            [sys.executable, __file__, *arguments], stdout=captured, env=dict(os.environ, PYTHONPATH=str(ROOT))
        )
        _, wait_status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
        child.returncode = returncode = os.waitstatus_to_exitcode(wait_status)
        captured.seek(0)
        lines = [line for line in captured.read().splitlines() if line.startswith("{")]
    record = json.loads(lines[-1]) if lines and returncode == 0 else {"error": f"exit code {returncode}"}
    record.update(wall_s=round(wall, 2), process_peak_rss_bytes=usage.ru_maxrss * 1024)
    return record, returncode


def add_eval_losses(records: list, forwarded: list) -> int:
    """Every trained adapter's eval loss, one child per (model, compute dtype): the base loaded once."""
    groups: dict = {}
    for record in records:
        if "error" not in record:
            groups.setdefault((record["model"], record["settings"]["compute_dtype"]), []).append(record)
    status = 0
    for (model, dtype), group in groups.items():
        result, returncode = measured_child(["--eval", model, dtype, *(r["adapter_dir"] for r in group)] + forwarded)
        for record in group:
            record.update(result.get(record["adapter_dir"], {"eval_loss": None}))
        status = status or returncode
    return status


def ratios(model: str, records: list, ours_run: str = "ours") -> dict:
    """Per model, ours against each other run: speed-up in whole-process wall time and in
    training time (theirs / ours: >1 is ours faster), peak RSS and eval loss (ours / theirs);
    DPO: also the held-out preference accuracy, ours minus theirs. `ours_run` another of our
    runs (ours-full-checkpointing ...): that one against the peer's runs of the same invocation.
    The issue-17 goals: >= 1.5x trl-default and >= 1.3x trl-best wall, RSS <= 1, eval loss within 2%."""
    line = {"ratios": f"{ours_run} on {model}: speed-ups theirs / ours; peak RSS and eval loss ours / theirs"}
    ours = next((record for record in records if record["run"] == ours_run), None)
    if not ours or "error" in ours:
        return line
    rss = "peak_memory_bytes" if ours.get("peak_memory_kind") == "gpu_allocated" else "process_peak_rss_bytes"
    for other in records:
        if other is ours or "error" in other or not other.get("eval_loss") or not ours.get("eval_loss"):
            continue
        if ours_run != "ours" and other["run"] in OURS_RUNS:
            continue
        line[other["run"]] = {
            "wall_speedup": round(other["wall_s"] / ours["wall_s"], 3),
            "train_speedup": round(other["train_s"] / ours["train_s"], 3),
            "peak_memory": round(ours[rss] / other[rss], 3),
            "eval_loss": round(ours["eval_loss"] / other["eval_loss"], 4),
        }
        if "eval_accuracy" in ours:  # DPO: held-out preference accuracy, ours - theirs
            line[other["run"]]["eval_accuracy_difference"] = round(ours["eval_accuracy"] - other["eval_accuracy"], 4)
    return line


def add_peer_mfu(records: list) -> None:
    """MFU of a run that is not ours: our run's useful FLOPs per supervised token (qlora/plan/flops.py,
    same rows' length mix) x its supervised tokens/s, over the same measured peak."""
    ours = next((record for record in records if record["run"] == "ours" and record.get("useful_flops")), None)
    if not ours:
        return
    per_token = ours["useful_flops"] / ours["supervised_tokens"]
    for record in records:
        if "error" not in record and "mfu" not in record:
            record["mfu_estimated"] = round(per_token * record["supervised_tokens_per_s"] / ours["peak_flops_per_s"], 5)


if __name__ == "__main__":
    sys.exit(main())
