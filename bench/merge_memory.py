"""Peak host memory of `qlora merge` on a model of a few hundred MB: one JSON line per run.

    python -m bench.merge_memory --work /tmp/merge-bench [--code OTHER_CHECKOUT] [--shard-size 64MB]

The model is the fixture's untied realistic Llama (132M parameters, 32k vocabulary, bfloat16:
~265 MB) saved in `--shard-size` shards, with a rank-16 LoRA on every linear layer (random B, so
the merge changes every weight). Each merge runs in a fresh process and reports its peak RSS
(VmHWM) and the RSS after importing torch / transformers / peft, before the merge: the
difference is what merging costs. `--code` measures another checkout of qlora (an older commit:
whole-model merges) with the same worker; its merge_adapter must accept the arguments used.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

MODES = {"streamed": {"check": False}, "streamed+check": {"check": True}}


def build(work: Path, shard_size: str) -> tuple[Path, Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from bench.fixture import variant_config

    base, adapter = work / "base", work / "adapter"
    if not (base / "config.json").is_file():
        config, tokenizer = variant_config("untied")
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.to(torch.bfloat16).save_pretrained(str(base), max_shard_size=shard_size)
        tokenizer.save_pretrained(str(base))
        del model
    if not (adapter / "adapter_config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        torch.manual_seed(1)
        peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        with torch.no_grad():
            for name, parameter in peft_model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0.0, 0.01)
        peft_model.save_pretrained(str(adapter))
    return base, adapter


def worker(adapter: str, out: str, options: str) -> None:
    import peft  # noqa: F401  (imported before the baseline: the libraries are not the merge's cost)
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from qlora.adapters.merge import merge_adapter

    before = memory_mb()
    report = merge_adapter(Path(adapter), Path(out), dtype="bfloat16", echo=lambda line: None, **json.loads(options))
    line = {"rss_after_imports_mb": before["VmRSS"], "peak_rss_mb": memory_mb()["VmHWM"], "shards": report.shards}
    print(json.dumps(line))


def memory_mb() -> dict:
    """This process's resident set now (VmRSS) and at its highest (VmHWM), in MB. Not ru_maxrss:
    Linux carries that over from the parent across fork + exec, so a child would report the
    parent's peak (here, the model build)."""
    fields = {}
    for row in Path("/proc/self/status").read_text().splitlines():
        name, _, value = row.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = round(int(value.split()[0]) / 1024)
    return fields


def measure(label: str, code: Path, adapter: Path, out: Path, options: dict, base_files: list[Path]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1"}
    shutil.rmtree(out, ignore_errors=True)
    # By path, not -m: the other checkout need not have this script.
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(adapter), str(out), json.dumps(options)]
    result = subprocess.run(command, env=env, cwd=str(code), capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return {"run": label, "error": result.stderr.strip().splitlines()[-1:]}
    line = json.loads(result.stdout.strip().splitlines()[-1])
    largest = max(path.stat().st_size for path in base_files)
    total = sum(path.stat().st_size for path in base_files)
    return {
        "run": label,
        **line,
        "base_mb": round(total / 2**20),
        "largest_base_shard_mb": round(largest / 2**20),
        "merge_cost_mb": line["peak_rss_mb"] - line["rss_after_imports_mb"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="folder for the model, adapter and merged outputs")
    parser.add_argument("--code", type=Path, action="append", default=[], help="another qlora checkout to measure")
    parser.add_argument("--shard-size", default="64MB", help="the base's safetensors shard size (default 64MB)")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    base, adapter = build(args.work, args.shard_size)
    base_files = sorted(base.glob("*.safetensors"))
    here = Path(__file__).resolve().parent.parent
    for label, options in MODES.items():
        print(json.dumps(measure(label, here, adapter, args.work / f"merged-{label}", options, base_files)))
    for number, code in enumerate(args.code):
        run = measure(f"whole-model ({code})", code, adapter, args.work / f"merged-other-{number}", {}, base_files)
        print(json.dumps(run))


if __name__ == "__main__":
    main()
