"""torch.compile probe (issue 7): measured, not kept; the numbers are in BENCHMARKS.md.

    python bench/compile_probe.py eager 10
    python bench/compile_probe.py compiled 10

Runs bench/compare.py's `ours` run in this process; `compiled` first compiles each decoder
layer's MLP, self_attn and RMSNorms (below gradient checkpointing: a compiled checkpointed layer
runs eager, see BENCHMARKS.md), with the per-row attention kept eager. Prints one JSON line.
"""

import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import bench.compare as compare  # noqa: E402
import bench.compare_runs as compare_runs  # noqa: E402
import qlora.job.run as job  # noqa: E402


def compile_below_checkpoint() -> None:
    from transformers import AttentionInterface

    from qlora.model.row_attention import ROW_ATTENTION, row_attention_forward

    # row_bounds' nonzero().tolist() is a graph break; keep the attention call out of the graphs.
    AttentionInterface.register(ROW_ATTENTION, torch.compiler.disable(row_attention_forward))
    attach = job.attach_lora

    def attach_and_compile(*args, **kwargs):
        model = attach(*args, **kwargs)
        for layer in model.base_model.model.model.layers:
            for part in (layer.mlp, layer.self_attn, layer.input_layernorm, layer.post_attention_layernorm):
                part.compile()
        return model

    job.attach_lora = attach_and_compile  # this probe only: the job runner builds the model


def main() -> None:
    mode, steps = sys.argv[1], int(sys.argv[2])
    if mode == "compiled":
        compile_below_checkpoint()
    args = compare.parse_args(["--runs", "ours@tied", "--steps", str(steps)])
    started = time.perf_counter()
    adapter_dir = Path(args.work) / "runs" / f"compile-probe-{mode}"
    record = compare_runs.run_one("ours", compare.settings_of(args), compare.fixture_of(args, "tied"), adapter_dir)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    keep = ("supervised_tokens_per_s", "train_s", "final_train_loss", "peak_memory_bytes", "mfu", "device")
    print(
        json.dumps(
            {
                "mode": mode,
                "steps": steps,
                **{key: record[key] for key in keep},
                "process_cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
                "process_wall_s": round(time.perf_counter() - started, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
