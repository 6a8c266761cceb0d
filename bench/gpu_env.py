"""The lent GPU machine as bench/gpu_proof.sh finds it, after installing the carried wheels: ONE JSON
line with the device and the versions that matter, and one 4-bit matmul through bitsandbytes'
CUDA kernels, so a wheel that does not fit the machine (its CUDA, its torch) fails here, in
seconds, and not inside the first test. Exit code 1 when something the proof needs is missing."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

LOWEST = Path(__file__).resolve().parents[1] / ".ci" / "lowest-versions.txt"

NEEDED = ("torch", "transformers", "accelerate", "peft", "safetensors", "bitsandbytes", "pydantic", "datasets", "trl")
# Not needed directly, but each carried wheel was checked against a version range of these.
BESIDE = ("pydantic_core", "huggingface_hub", "fsspec", "pyarrow", "numpy", "typing_extensions", "psutil")


def main() -> int:
    record, missing = {"gpu_env": True}, []
    for name in NEEDED + BESIDE:
        try:
            record[name] = getattr(importlib.import_module(name), "__version__", "?")
        except Exception as error:  # an import that fails for any reason is what this step reports
            record[name] = f"missing: {error.__class__.__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            missing += [name] if name in NEEDED else []
    import torch

    record["untested_here"] = untested(record)
    record["cuda"] = torch.version.cuda
    record["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    if record["device"] and "bitsandbytes" not in missing:
        record["bnb_4bit_matmul"] = four_bit_matmul_error()
    print(json.dumps(record), flush=True)
    return 1 if missing or not record["device"] or record.get("bnb_4bit_matmul") != "ok" else 0


def untested(record: dict) -> dict:
    """{name: [version here, version the lowest-versions leg ran]} where this machine differs from
    the CPU rehearsal of it (.ci/lowest-versions.txt): a number to read before trusting a result."""
    pins = {}
    for line in LOWEST.read_text().splitlines():
        if "==" in line and not line.lstrip().startswith("#"):
            name, version = line.strip().split("==")
            pins[name.replace("-", "_")] = version
    found = {}
    for name, version in record.items():
        here = version.split("+")[0] if isinstance(version, str) else version
        if name in pins and version != "?" and here != pins[name]:
            found[name] = [version, pins[name]]
    return found


def four_bit_matmul_error() -> str:
    """'ok' when an NF4 linear's forward on the GPU matches its dequantized weight's, else the error."""
    try:
        import bitsandbytes as bnb
        import torch

        layer = bnb.nn.Linear4bit(256, 128, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4").cuda()
        inputs = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)
        weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        expected = inputs @ weight.t()
        close = torch.allclose(layer(inputs), expected, rtol=2e-2, atol=2e-2)
        return "ok" if close else "4-bit matmul differs from the dequantized weight's"
    except Exception as error:  # the step reports whatever broke, in one line
        return f"{error.__class__.__name__}: {str(error).splitlines()[0] if str(error) else ''}"


if __name__ == "__main__":
    sys.exit(main())
