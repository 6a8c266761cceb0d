"""Where one optimizer step of `ours` spends its time: torch.profiler over one step of
bench/compare.py's run, in this process, top ops by self CPU time (issue 17: the levers).

    python bench/profile_step.py                              # ours@tied, step 3 of 4, default config
    python bench/profile_step.py --run ours-packing --model untied --out /tmp/profile.json
    python bench/profile_step.py --set train.gradient_checkpointing=selective   # a lever, before / after

The run is compare.py's (same fixture in --work, same job file, the project's defaults); the
profiler records exactly one optimizer step (all its micro-batches: forward, backward, clip,
AdamW) after --skip steps, so the first steps' one-off costs (oneDNN primitive creation, the
allocator's first growth) stay out. Profiling slows the step (per-op records): compare shares,
not seconds, with compare.py's timings. Prints the table and writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import compare  # noqa: E402
from bench.compare_runs import OURS_RUNS, ours_job  # noqa: E402

# What an op is, for the summary: the first pattern in its name wins.
KINDS = (
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "mkldnn")),
    ("attention", ("flash", "attention", "sdpa")),
    ("4-bit dequantize", ("bitsandbytes", "dequant", "bnb")),
    ("loss / softmax", ("log_softmax", "nll_loss", "cross_entropy", "softmax")),
    ("dropout masks", ("random_", "bernoulli", "aten::ge", "dropout")),
    ("copies / casts", ("aten::copy_", "aten::to", "aten::_to_copy", "aten::contiguous", "aten::clone", "aten::cat")),
    ("optimizer", ("adam", "_foreach", "aten::lerp", "aten::addcdiv", "aten::addcmul", "aten::sqrt")),
    ("elementwise", ("aten::mul", "aten::add", "aten::silu", "aten::pow", "aten::rsqrt", "aten::mean", "aten::neg")),
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="ours", choices=list(OURS_RUNS))
    parser.add_argument("--model", default="tied", choices=compare.MODELS)
    parser.add_argument("--skip", type=int, default=2, help="optimizer steps before the profiled one (>= 1)")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--set", action="append", default=[], help="SECTION.KEY=VALUE on the job file (YAML value)")
    parser.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "qlora-profile-step.json"))
    args, rest = parser.parse_known_args(argv)
    bench_args = compare.parse_args(rest + ["--runs", f"{args.run}@{args.model}"])
    # compare.py's rows (its --train-rows default follows its --steps), fewer steps: a packing run
    # still takes its one epoch.
    bench_args.steps = args.skip + 2
    settings = compare.settings_of(bench_args)
    fixture = compare.fixture_of(bench_args, args.model)

    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from torch.profiler import ProfilerActivity, profile, schedule

    from qlora.config import load_config
    from qlora.job.run import run_job

    folder = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    job = ours_job(settings, fixture, OURS_RUNS[args.run], folder / "out")
    for item in args.set:
        key, _, value = item.partition("=")
        section, _, field = key.partition(".")
        job[section][field] = yaml.safe_load(value)
    (folder / "job.yaml").write_text(yaml.safe_dump(job))
    step_ends, captured = [], []
    # One cycle (repeat=1), summarized the moment it ends: later cycles would clear its events.
    plan = schedule(wait=args.skip - 1, warmup=1, active=1, repeat=1)
    with profile(
        activities=[ProfilerActivity.CPU],
        schedule=plan,
        on_trace_ready=lambda done: captured.append(summarize(done.key_averages(), args.top)),
    ) as profiler:

        def stepped(optimizer, *_):
            step_ends.append(time.perf_counter())
            profiler.step()

        handle = register_optimizer_step_post_hook(stepped)
        try:
            run_job(load_config(folder / "job.yaml"), echo=lambda line: print(line, file=sys.stderr))
        finally:
            handle.remove()
    summary = captured[0]
    summary.update(
        run=f"{args.run}@{args.model}",
        job_changes=args.set,
        profiled_step=args.skip + 1,
        # Wall time of steps 2, 3, ...: the profiled one (step skip + 1) pays the profiler's overhead.
        step_wall_s=[round(end - start, 3) for start, end in zip(step_ends, step_ends[1:])],
        threads=torch.get_num_threads(),
        torch=torch.__version__,
    )
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print_table(summary)
    print(f"written: {args.out}", file=sys.stderr)
    return 0


def kind_of(name: str) -> str:
    lowered = name.lower()
    for kind, patterns in KINDS:
        if any(pattern.lower() in lowered for pattern in patterns):
            return kind
    return "other"


def summarize(averages, top: int) -> dict:
    """Self CPU time per op (each op's time less its children's, so the rows add up to the step)."""
    rows = [(event.key, event.self_cpu_time_total / 1e6, event.count) for event in averages]
    rows = [row for row in rows if row[1] > 0 and not row[0].startswith("ProfilerStep")]
    total = sum(seconds for _, seconds, _ in rows)
    rows.sort(key=lambda row: -row[1])
    kinds: dict = {}
    for name, seconds, _ in rows:
        kinds[kind_of(name)] = kinds.get(kind_of(name), 0.0) + seconds
    return {
        "self_cpu_s_total": round(total, 3),
        "by_kind": {
            kind: {"s": round(s, 3), "share": round(s / total, 4)}
            for kind, s in sorted(kinds.items(), key=lambda kv: -kv[1])
        },
        "top_ops": [
            {
                "op": name,
                "self_cpu_s": round(seconds, 4),
                "share": round(seconds / total, 4),
                "calls": calls,
                "kind": kind_of(name),
            }
            for name, seconds, calls in rows[:top]
        ],
    }


def print_table(summary: dict) -> None:
    print(f"{summary['run']}, step {summary['profiled_step']}: {summary['self_cpu_s_total']} s self CPU")
    for kind, value in summary["by_kind"].items():
        print(f"  {kind:18} {value['s']:8.3f} s  {100 * value['share']:5.1f}%")
    for row in summary["top_ops"]:
        print(f"  {row['op'][:60]:60} {row['self_cpu_s']:8.3f} s  {100 * row['share']:5.1f}%  x{row['calls']}")


if __name__ == "__main__":
    sys.exit(main())
