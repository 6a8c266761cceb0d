"""Merge an adapter into a 16-bit copy of its base: W' = W + scale * B A, for zero-latency serving.

The delta is never rounded into 4-bit: the base is loaded unquantized in the output dtype and
peft adds the float32 delta to it. The adapter was trained against the NF4 base, though, so the
merged model differs a little from what training saw; the report measures both divergences
(vs the 16-bit base + adapter and vs the NF4 base + adapter) on a few prompts. `through_nf4`
first replaces each quantizable base weight by its NF4 round trip (quantized as training did,
then dequantized), which matches training exactly at the price of the base's own NF4 error.

The result is written to a temp folder next to the output and renamed into place: sharded
safetensors + index, config, generation config and tokenizer, loadable by plain transformers.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

from qlora.adapters.loading import load_with_adapters, select_adapter, trained_quantization
from qlora.adapters.manifest import read_adapter_config, recorded_base
from qlora.config import QuantizationSection
from qlora.errors import ConfigError, ModelError, OutputError
from qlora.output_dir import apply_umask
from qlora.sizes import format_bytes

MERGE_DTYPES = ("bfloat16", "float16", "float32")
DEFAULT_PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Question: what is 12 + 30?\nAnswer:",
    "def reverse(text):",
)
MERGE_RECORD = "qlora_merge.json"


@dataclass
class MergeReport:
    output_dir: str
    dtype: str
    through_nf4: bool
    shards: int
    bytes: int
    prompts: int
    max_diff_vs_16bit_adapter: float
    """max |logit| difference, merged vs the 16-bit base + adapter (unmerged)."""
    max_diff_vs_nf4_adapter: Optional[float]
    """max |logit| difference, merged vs the NF4 base + adapter training saw (None: trained 16-bit)."""
    max_abs_logit: float
    """The largest |logit| of the merged model on those prompts: the scale the differences are on."""


def merge_adapter(
    adapter_dir: Path,
    output_dir: Path,
    *,
    dtype: str = "bfloat16",
    base: Optional[str] = None,
    through_nf4: bool = False,
    max_shard_size: str = "5GB",
    prompts: tuple[str, ...] = DEFAULT_PROMPTS,
    echo: Callable[[str], None] = print,
) -> MergeReport:
    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    base, trained = check_merge_request(adapter_dir, output_dir, dtype, base, through_nf4, max_shard_size)

    echo(f"loading {base} unquantized in {dtype}")
    model, tokenizer = load_with_adapters(
        [("merge", adapter_dir)], base=base, bits=16, compute_dtype=dtype, warn=lambda line: None
    )
    input_ids = tokenize_prompts(tokenizer, prompts)
    reference_16bit = all_logits(model, input_ids)
    reference_nf4 = None
    if trained.bits == 4 or through_nf4:
        reference_nf4 = quantized_reference(model, adapter_dir, base, trained, input_ids, through_nf4, echo)

    select_adapter(model, "merge")
    merged = model.merge_and_unload()
    merged_logits = all_logits(merged, input_ids)
    report_16 = max_difference(merged_logits, reference_16bit)
    report_nf4 = max_difference(merged_logits, reference_nf4) if reference_nf4 is not None else None

    # Written next to the output and renamed into place: a kill never leaves half a model at output_dir.
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        shards = save_merged(merged, tokenizer, staging, dtype, max_shard_size)
        report = MergeReport(
            output_dir=str(output_dir),
            dtype=dtype,
            through_nf4=through_nf4,
            shards=len(shards),
            bytes=sum(path.stat().st_size for path in shards),
            prompts=len(prompts),
            max_diff_vs_16bit_adapter=report_16,
            max_diff_vs_nf4_adapter=report_nf4,
            max_abs_logit=max(logits.abs().max().item() for logits in merged_logits),
        )
        record = {"adapter": str(adapter_dir.resolve()), "base": base, **asdict(report)}
        (staging / MERGE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        publish(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report


def check_merge_request(
    adapter_dir: Path, output_dir: Path, dtype: str, base: Optional[str], through_nf4: bool, max_shard_size: str
) -> tuple[Optional[str], QuantizationSection]:
    """The base to merge into and the quantization the adapter was trained on. Every flag is
    checked here, before a weight is loaded, so a typo costs seconds, not a model load."""
    if dtype not in MERGE_DTYPES:
        raise ConfigError(f"--dtype: {dtype!r} is not one of {', '.join(MERGE_DTYPES)}")
    check_output(output_dir)
    check_shard_size(max_shard_size)
    read_adapter_config(adapter_dir)
    base = base or recorded_base(adapter_dir)
    trained = trained_quantization(adapter_dir)
    if through_nf4 and trained.bits == 8:
        raise ConfigError("--through-nf4: this adapter was trained on an 8-bit base, not NF4")
    return base, trained


def tokenize_prompts(tokenizer, prompts: tuple[str, ...]) -> list:
    import torch

    return [torch.tensor([tokenizer(prompt)["input_ids"]]) for prompt in prompts]


def quantized_reference(
    model16,
    adapter_dir: Path,
    base: Optional[str],
    trained: QuantizationSection,
    input_ids: list,
    through_nf4: bool,
    echo,
) -> list:
    """Logits of the 4-bit base + adapter that training saw. With through_nf4, `model16`'s base
    weights also take their round trip through 4-bit, so the merge starts from training's base.
    The quantized copy is freed on return, before the merge needs memory of its own."""
    echo(f"loading the {trained.quant_type.upper()} base the adapter was trained on, for comparison")
    quantized, _ = load_with_adapters([("merge", adapter_dir)], base=base, bits=4, warn=lambda line: None)
    reference = all_logits(quantized, input_ids)
    if through_nf4:
        replaced = copy_dequantized_weights(quantized, model16)
        echo(f"replaced {replaced} base weights by their {trained.quant_type.upper()} round trip")
    return reference


def save_merged(merged, tokenizer, staging: Path, dtype: str, max_shard_size: str) -> list[Path]:
    """Write the merged model and tokenizer to `staging`; returns the safetensors shards."""
    import torch

    # The base loader turns the KV cache off for training; whoever loads the merged model generates.
    merged.config.use_cache = True
    merged.config.dtype = getattr(torch, dtype)
    merged.save_pretrained(str(staging), max_shard_size=max_shard_size)
    tokenizer.save_pretrained(str(staging))
    return sorted(staging.glob("*.safetensors"))


def check_shard_size(max_shard_size: str) -> None:
    from transformers.utils.hub import convert_file_size_to_int

    try:
        convert_file_size_to_int(max_shard_size)
    except (ValueError, TypeError):
        raise ConfigError(f"--max-shard-size: {max_shard_size!r} is not a size like 5GB or 500MB") from None


def check_output(output_dir: Path) -> None:
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise OutputError(f"--out: {output_dir} already exists and is not empty; choose a new folder")
    if not output_dir.parent.is_dir():
        raise OutputError(f"--out: parent folder {output_dir.parent} does not exist")
    if not os.access(output_dir.parent, os.W_OK):
        raise OutputError(f"--out: cannot write to {output_dir.parent}")


def publish(staging: Path, output_dir: Path) -> None:
    """mkdtemp folders are 0700; the merged model is for others to read too."""
    apply_umask(staging)
    if output_dir.is_dir():
        output_dir.rmdir()  # empty (checked before loading): replaced by the complete folder
    os.rename(staging, output_dir)


def copy_dequantized_weights(quantized_model, model16) -> int:
    """Overwrite each base weight of `model16` that is 4-bit in `quantized_model` (same module
    names: both carry the same adapter) with its dequantized NF4 value."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_functional

    targets = dict(model16.named_modules())
    replaced = 0
    for name, module in quantized_model.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        if name not in targets:
            raise ModelError(f"--through-nf4: {name} is 4-bit in the quantized base but missing from the 16-bit one")
        weight = module.weight
        dequantized = bnb_functional.dequantize_4bit(weight.data, weight.quant_state)
        target = targets[name].weight
        target.data.copy_(dequantized.to(device=target.device, dtype=target.dtype))
        replaced += 1
    return replaced


def all_logits(model, input_ids_list: list) -> list:
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        return [model(input_ids=ids.to(device)).logits.float().cpu() for ids in input_ids_list]


def max_difference(first: list, second: list) -> float:
    return max((a - b).abs().max().item() for a, b in zip(first, second))


def describe_merge(report: MergeReport) -> str:
    lines = [
        f"merged: {report.output_dir} ({report.shards} safetensors shard{'s' if report.shards != 1 else ''}, "
        f"{format_bytes(report.bytes)}, {report.dtype}{', base through NF4' if report.through_nf4 else ''})",
        f"max |logit difference| on {report.prompts} prompts (largest |logit| {report.max_abs_logit:.3g}):",
        f"  vs 16-bit base + adapter:             {report.max_diff_vs_16bit_adapter:.6g}",
    ]
    if report.max_diff_vs_nf4_adapter is not None:
        lines.append(f"  vs NF4 base + adapter (training's):   {report.max_diff_vs_nf4_adapter:.6g}")
    lines.append("load it with transformers.AutoModelForCausalLM.from_pretrained(" + repr(report.output_dir) + ")")
    return "\n".join(lines)
