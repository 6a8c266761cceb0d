"""What autograd keeps for backward in one forward of bench/compare.py's `ours` model, with our
lean LoRA forward (qlora/adapters/lean_lora.py) and with peft's own, by dtype and last dimension.

    python bench/saved_tensors.py                     # the tied fixture, compute bfloat16, 600 tokens
    python bench/saved_tensors.py --tokens 300 --compute-dtype float32

No checkpointing (what `auto` picks on this CPU), one padding-free micro-batch of --tokens
positions, the head at one position (the loop computes logits only at supervised ones).
Parameters are not counted; a storage several ops save is counted once. Prints one JSON line per
forward and a ratio line.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MIB = 1024 * 1024


def saved_bytes(model, input_ids) -> tuple[int, dict]:
    """(total bytes, bytes by 'dtype x last dim') of the storages autograd saves in one forward."""
    import torch

    parameters = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}
    seen, by_kind = set(), collections.Counter()

    def pack(tensor):
        key = tensor.untyped_storage().data_ptr()
        if key not in parameters and key not in seen:
            seen.add(key)
            last = tensor.shape[-1] if tensor.dim() else 1
            by_kind[f"{str(tensor.dtype).removeprefix('torch.')} x {last}"] += tensor.untyped_storage().nbytes()
        return tensor

    positions = torch.arange(input_ids.shape[1])[None]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=input_ids, position_ids=positions, use_cache=False, logits_to_keep=1)
    return sum(by_kind.values()), dict(by_kind.most_common())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tied", choices=("tied", "untied", "byte"))
    parser.add_argument("--tokens", type=int, default=600)
    parser.add_argument("--compute-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "qlora-bench-compare"))
    args = parser.parse_args(argv)

    import torch
    import yaml

    from bench import compare
    from bench.compare_runs import ours_job
    from qlora.config import load_config
    from qlora.job.placement import place_model
    from qlora.training.distributed import World

    bench_args = compare.parse_args(["--work", args.work, "--runs", f"ours@{args.model}"])
    settings = compare.settings_of(bench_args)
    fixture = compare.fixture_of(bench_args, args.model)
    changes = {"quantization": {"compute_dtype": args.compute_dtype}, "train": {"gradient_checkpointing": False}}
    folder = Path(tempfile.mkdtemp(prefix="bench-saved-"))
    (folder / "job.yaml").write_text(yaml.safe_dump(ours_job(settings, fixture, changes, folder / "out")))
    model = place_model(load_config(folder / "job.yaml"), World(), echo=lambda line: None).trained.train()
    input_ids = torch.randint(3, 250, (1, args.tokens))  # byte tokens: in every fixture vocabulary

    results = {}
    lean = {module: module.__dict__.pop("forward") for module in model.modules() if "forward" in module.__dict__}
    results["peft"] = saved_bytes(model, input_ids)
    for module, forward in lean.items():
        module.forward = forward
    results["lean"] = saved_bytes(model, input_ids)
    for forward, (total, by_kind) in results.items():
        mib = {kind: round(size / MIB, 1) for kind, size in by_kind.items()}
        print(json.dumps({"forward": forward, "tokens": args.tokens, "saved_mib": round(total / MIB, 1), "by": mib}))
    print(json.dumps({"lean_over_peft": round(results["lean"][0] / results["peft"][0], 3), "lora_layers": len(lean)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
