"""Merge an adapter into a 16-bit copy of its base: W' = W + scale * B A, for zero-latency serving.

The merge streams: it reads the base's safetensors files one shard at a time and writes the merged
shards as it goes (qlora.adapters.streamed_merge), so a 70B merges in the host memory of one shard
on any machine, with or without a GPU. The arithmetic is peft's merge_and_unload's, bit for bit,
and the delta is never rounded into 4-bit. Every adapter tensor is mapped onto a base tensor and
every shape checked from the files' headers first (qlora.adapters.merge_plan), so a bad adapter is
one line before anything is written.

The adapter was trained against the NF4 base, though, so the merged model differs a little from
what training saw; the report's check measures both divergences (vs the 16-bit base + adapter and
vs the NF4 base + adapter) on a few prompts, loading models one at a time on the CPU
(qlora.adapters.merge_check, which says what that costs; on by default for small bases only).
`through_nf4` first replaces each quantizable base weight by its NF4 round trip (quantized as
training did, then dequantized), which matches training exactly at the price of the base's own
NF4 error.

The result is written to a temp folder next to the output and renamed into place: safetensors
shards + index, config, generation config and tokenizer, loadable by plain transformers.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

from qlora.adapters.base_files import base_shards, checkpoint_bytes, resolve_base_dir, tensor_layout
from qlora.adapters.loading import (
    inference_tokenizer,
    resolve_base,
    tokenizer_source,
    trained_quantization,
    usable_dtype,
)
from qlora.adapters.manifest import ADAPTER_WEIGHTS, check_base, read_adapter_config, read_manifest
from qlora.adapters.merge_check import CHECK_BY_DEFAULT_BYTES, check_merged_logits
from qlora.adapters.merge_plan import base_key, plan_merge
from qlora.adapters.streamed_merge import write_merged_shards, write_model_files
from qlora.config import QuantizationSection
from qlora.errors import ConfigError, OutputError
from qlora.model.skeleton import four_bit_weights, nf4_round_trip, quantizable_skeleton, tied_weight_aliases
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
    max_diff_vs_16bit_adapter: Optional[float]
    """max |logit| difference, merged vs the 16-bit base + adapter (unmerged); None: not checked."""
    max_diff_vs_nf4_adapter: Optional[float]
    """max |logit| difference, merged vs the NF4 base + adapter training saw (None: trained 16-bit, or not checked)."""
    max_abs_logit: Optional[float]
    """The largest |logit| of the merged model on those prompts: the scale the differences are on."""
    checked: bool = True
    """Whether the logit check ran (qlora.adapters.merge_check: off by default for large bases)."""


def merge_adapter(
    adapter_dir: Path,
    output_dir: Path,
    *,
    dtype: str = "bfloat16",
    base: Optional[str] = None,
    through_nf4: bool = False,
    max_shard_size: str = "5GB",
    prompts: tuple[str, ...] = DEFAULT_PROMPTS,
    check: Optional[bool] = None,
    echo: Callable[[str], None] = print,
) -> MergeReport:
    """Merge `adapter_dir` into its base (or `base`) and publish the model at `output_dir`.
    check: compare logits after writing (None: only for bases under CHECK_BY_DEFAULT_BYTES)."""
    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    base, trained = check_merge_request(adapter_dir, output_dir, dtype, base, through_nf4, max_shard_size)
    revision = recorded_revision(adapter_dir, base)
    base_dir = resolve_base_dir(base, revision)
    shards = base_shards(base_dir)
    layout = tensor_layout(shards)
    skeleton = model_skeleton(base_dir, trained, through_nf4)
    check_base(adapter_dir, skeleton.config.to_dict(), base)
    aliases = tied_weight_aliases(skeleton)
    plan = plan_merge(adapter_dir, layout, aliases, skeleton.base_model_prefix)
    round_trip = nf4_round_trip_of(skeleton, layout, trained) if through_nf4 else None
    # From here on the base is its local folder: the tokenizer and the check read the files merged.
    tokenizer = inference_tokenizer(str(base_dir), tokenizer_source(adapter_dir, str(base_dir)))
    base_bytes = checkpoint_bytes(shards)
    check = base_bytes <= CHECK_BY_DEFAULT_BYTES if check is None else check

    echo(
        f"merging {base} ({len(shards)} shard{'s' if len(shards) != 1 else ''}, {format_bytes(base_bytes)}) "
        f"into {dtype}: {len(plan.deltas)} LoRA deltas, {len(plan.replaced)} full tensors"
    )
    # Written next to the output and renamed into place: a kill never leaves half a model at output_dir.
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        written = write_merged_shards(
            layout,
            plan,
            adapter_dir / ADAPTER_WEIGHTS,
            staging,
            dtype,
            shard_bytes(max_shard_size),
            round_trip=round_trip,
            echo=echo,
        )
        write_model_files(base_dir, staging, dtype)
        tokenizer.save_pretrained(str(staging))
        logits = None
        if check:
            logits = check_merged_logits(
                staging,
                adapter_dir,
                str(base_dir),
                trained,
                tokenizer,
                dtype=dtype,
                prompts=prompts,
                nf4_reference=trained.bits == 4 or through_nf4,
                echo=echo,
            )
        else:
            echo(f"logit check skipped: the base is over {format_bytes(CHECK_BY_DEFAULT_BYTES)} (--check runs it)")
        report = MergeReport(
            output_dir=str(output_dir),
            dtype=dtype,
            through_nf4=through_nf4,
            shards=len(written),
            bytes=sum(path.stat().st_size for path in written),
            prompts=len(prompts) if check else 0,
            max_diff_vs_16bit_adapter=logits.max_diff_vs_16bit_adapter if logits else None,
            max_diff_vs_nf4_adapter=logits.max_diff_vs_nf4_adapter if logits else None,
            max_abs_logit=logits.max_abs_logit if logits else None,
            checked=check,
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
) -> tuple[str, QuantizationSection]:
    """The base to merge into and the quantization the adapter was trained on. Every flag is
    checked here, before a weight is read, so a typo costs nothing."""
    if dtype not in MERGE_DTYPES:
        raise ConfigError(f"--dtype: {dtype!r} is not one of {', '.join(MERGE_DTYPES)}")
    check_output(output_dir)
    shard_bytes(max_shard_size)
    read_adapter_config(adapter_dir)
    base = resolve_base([("merge", adapter_dir)], base)
    trained = trained_quantization(adapter_dir)
    if through_nf4 and trained.bits == 8:
        raise ConfigError("--through-nf4: this adapter was trained on an 8-bit base, not NF4")
    return base, trained


def recorded_revision(adapter_dir: Path, base: str) -> Optional[str]:
    """The revision training used, when merging into the base it recorded."""
    record = (read_manifest(adapter_dir) or {}).get("base", {})
    return record.get("revision") if base == record.get("name_or_path") else None


def model_skeleton(base_dir: Path, trained: QuantizationSection, through_nf4: bool):
    """The base's module tree on the meta device: tied names, prefix, and (through_nf4) its 4-bit weights."""
    if not through_nf4:
        return quantizable_skeleton(base_dir)
    compute = usable_dtype(trained.compute_dtype, on_cpu=True)
    return quantizable_skeleton(base_dir, quantization=trained.model_copy(update={"compute_dtype": compute}))


def nf4_round_trip_of(skeleton, layout: dict, trained: QuantizationSection) -> Callable:
    """(checkpoint key, tensor) -> the tensor as training's NF4 base held it (others unchanged)."""
    import torch

    aliases = tied_weight_aliases(skeleton)
    four_bit = {
        base_key(name, layout, aliases, skeleton.base_model_prefix): parameter
        for name, parameter in four_bit_weights(skeleton).items()
    }
    compute = getattr(torch, usable_dtype(trained.compute_dtype, on_cpu=True))

    def round_trip(key: str, value):
        return nf4_round_trip(value, four_bit[key], compute) if key in four_bit else value

    return round_trip


def shard_bytes(max_shard_size: str) -> int:
    from transformers.utils.hub import convert_file_size_to_int

    try:
        return convert_file_size_to_int(max_shard_size)
    except (ValueError, TypeError):
        raise ConfigError(f"--max-shard-size: {max_shard_size!r} is not a size like 5GB or 500MB") from None


def check_output(output_dir: Path, new_file: bool = False) -> None:
    """--out must be new (a folder may exist empty), in a folder we can write to."""
    if new_file and (output_dir.exists() or output_dir.is_symlink()):
        raise OutputError(f"--out: {output_dir} already exists; choose a new file")
    if not new_file and output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
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


def describe_merge(report: MergeReport) -> str:
    lines = [
        f"merged: {report.output_dir} ({report.shards} safetensors shard{'s' if report.shards != 1 else ''}, "
        f"{format_bytes(report.bytes)}, {report.dtype}{', base through NF4' if report.through_nf4 else ''})",
    ]
    if report.checked:
        lines += [
            f"max |logit difference| on {report.prompts} prompts (largest |logit| {report.max_abs_logit:.3g}):",
            f"  vs 16-bit base + adapter:             {report.max_diff_vs_16bit_adapter:.6g}",
        ]
        if report.max_diff_vs_nf4_adapter is not None:
            lines.append(f"  vs NF4 base + adapter (training's):   {report.max_diff_vs_nf4_adapter:.6g}")
    else:
        lines.append("logits not checked (run with --check to compare them, on the CPU, one model at a time)")
    lines.append("load it with transformers.AutoModelForCausalLM.from_pretrained(" + repr(report.output_dir) + ")")
    return "\n".join(lines)
