"""Sizes and times of `qlora export`: the demo adapter and a 132M-parameter model, one JSON line
per (model, dtype), each export in a fresh process.

    python -m bench.export_sizes --work /tmp/export-bench

The large model is the fixture's untied realistic Llama (132M parameters, 32k vocabulary,
bfloat16) with a rank-16 LoRA on every linear layer (bench.merge_memory's build); the demo
adapter is `configs/demo.yaml` trained into WORK/demo (once). Each line: GGUF bytes, wall
seconds of the whole export (merge, GGUF write, read-back check unless `no-check`), peak RSS
(VmHWM), and the check's max |logit| difference vs the merged model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# (dtype, check): the last run shows what the export itself costs, without the read-back's two
# float32 models.
RUNS = (("f16", "check"), ("bf16", "check"), ("q8_0", "check"), ("f16", "no-check"))


def worker(adapter: str, out: str, dtype: str, check: str) -> None:
    from bench.merge_memory import memory_mb
    from qlora.adapters.export import export_adapter

    started = time.monotonic()
    report = export_adapter(Path(adapter), Path(out), dtype=dtype, check=check == "check", echo=lambda line: None)
    record = {
        "gguf_bytes": report.bytes,
        "seconds": round(time.monotonic() - started, 1),
        "peak_rss_mb": memory_mb()["VmHWM"],
        "max_logit_diff": report.max_logit_diff,
        "max_abs_logit": report.max_abs_logit,
        "same_token_ids": report.same_token_ids,
        "merged_bytes": report.merge["bytes"],
    }
    print(json.dumps(record))


def demo_adapter(work: Path) -> Path:
    out = work / "demo"
    if not (out / "summary.json").is_file():
        command = [sys.executable, "-m", "qlora.cli", "train", str(ROOT / "configs" / "demo.yaml")]
        subprocess.run([*command, "--set", f"output.dir={out}", "--overwrite"], check=True, capture_output=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    from bench.merge_memory import build

    args.work.mkdir(parents=True, exist_ok=True)
    models = {"demo": demo_adapter(args.work), "llama-132m-32k": build(args.work / "large", "2GB")[1]}
    for model, adapter in models.items():
        for dtype, check in RUNS:
            out = args.work / f"{model}-{dtype}.gguf"
            out.unlink(missing_ok=True)
            command = [sys.executable, "-m", "bench.export_sizes", "--work", str(args.work), "--worker"]
            command += [str(adapter), str(out), dtype, check]
            result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
            run = {"model": model, "dtype": dtype, "check": check}
            if result.returncode != 0:
                print(json.dumps({**run, "error": result.stderr.strip().splitlines()[-1]}))
                continue
            print(json.dumps({**run, **json.loads(result.stdout.strip().splitlines()[-1])}), flush=True)


if __name__ == "__main__":
    main()
