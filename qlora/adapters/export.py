"""`qlora export`: adapter -> merged 16-bit model -> one GGUF (llama.cpp), or a GGUF + Modelfile
folder (Ollama).

The merge is `qlora merge`'s (adapters.merge: into a 16-bit copy of the base, never through
4-bit), written to a staging folder beside the output and removed afterwards; the GGUF is
written from that folder one tensor at a time (gguf_file). Every flag, the base, the
architecture and the tokenizer are checked before any weight is loaded. The check reads the
GGUF back with transformers' own GGUF loader, a reader we did not write, and compares its
logits and token ids with the merged model's.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

from qlora.adapters.base_files import base_shards, resolve_base_dir, tensor_layout
from qlora.adapters.gguf_arch import gguf_architecture
from qlora.adapters.gguf_file import GGUF_DTYPES, MERGE_DTYPE_FOR, write_gguf
from qlora.adapters.gguf_vocab import read_vocabulary
from qlora.adapters.loading import resolve_base, tokenizer_source
from qlora.adapters.merge import DEFAULT_PROMPTS, check_output, merge_adapter
from qlora.adapters.merge_check import all_logits, max_difference, tokenize_prompts
from qlora.adapters.vllm_check import VllmVerdict, read_verdict
from qlora.errors import ConfigError, ModelError, OutputError
from qlora.output_dir import apply_umask
from qlora.sizes import format_bytes

EXPORT_FORMATS = ("gguf", "ollama")
# Reading a GGUF back dequantizes it to float32 beside the merged model: past this many bytes of
# 16-bit weights the check would need tens of GB, so it is skipped unless asked for.
CHECK_BYTES_LIMIT = 2 * 2**30
# GGUF bytes per 16-bit merged byte: q8_0 stores 34 bytes per 32 weights.
GGUF_SIZE_RATIO = {"f16": 1.0, "bf16": 1.0, "q8_0": 34 / 64}


@dataclass
class ExportReport:
    format: str
    dtype: str
    gguf: str
    bytes: int
    tensors: int
    architecture: str
    tokenizer: str
    seconds: float
    merge: dict
    checked: bool
    max_logit_diff: Optional[float] = None
    """max |logit| difference, GGUF read back by transformers vs the merged 16-bit model."""
    max_abs_logit: Optional[float] = None
    same_token_ids: Optional[bool] = None
    modelfile: Optional[str] = None
    ollama_command: Optional[str] = None
    notes: tuple = ()
    vllm: Optional[dict] = None


def export_adapter(
    adapter_dir: Path,
    out: Path,
    *,
    format: str = "gguf",
    dtype: str = "f16",
    base: Optional[str] = None,
    name: Optional[str] = None,
    check: Optional[bool] = None,
    prompts: tuple[str, ...] = DEFAULT_PROMPTS,
    echo: Callable[[str], None] = print,
) -> ExportReport:
    adapter_dir, out = Path(adapter_dir), Path(out)
    started = time.monotonic()
    base = check_export_request(adapter_dir, out, format, dtype, base)
    name = name or adapter_dir.resolve().name
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        merged_dir = staging / "merged"
        merge = merge_adapter(
            adapter_dir,
            merged_dir,
            dtype=MERGE_DTYPE_FOR[dtype],
            base=base,
            prompts=prompts,
            check=check,
            echo=echo,
        )
        # Both formats are built in the staging folder and renamed into place last: a failed check
        # leaves nothing at --out, and a rerun is not refused by an unverified file.
        built = staging / "built"
        built.mkdir()
        gguf_path = built / (f"{ollama_name(name)}.gguf" if format == "ollama" else out.name)
        echo(f"writing {dtype} GGUF ({format_bytes(merge.bytes)} of merged weights)")
        written = write_gguf(merged_dir, gguf_path, dtype, name)
        report = ExportReport(
            format=format,
            dtype=dtype,
            gguf=str(out / gguf_path.name) if format == "ollama" else str(out),
            bytes=written.bytes,
            tensors=written.tensors,
            architecture=written.architecture,
            tokenizer=written.tokenizer,
            seconds=0.0,
            merge=asdict(merge),
            checked=False,
            vllm=asdict(read_verdict(adapter_dir)),
        )
        if check or (check is None and merge.bytes <= CHECK_BYTES_LIMIT):
            echo("reading the GGUF back with transformers' GGUF loader to compare logits")
            read_back(report, merged_dir, gguf_path, prompts)
        elif check is None:
            report.notes += (
                f"not read back (merged weights over {format_bytes(CHECK_BYTES_LIMIT)}; --check forces it)",
            )
        if format == "ollama":
            finish_ollama(report, merged_dir, built, gguf_path.name, out, name)
        else:
            publish_file(gguf_path, out)
    except OSError as error:
        # numpy's tofile reports a short write without an errno: a disk with almost nothing free tells.
        full = error.errno in (errno.ENOSPC, errno.EDQUOT) or shutil.disk_usage(out.parent).free < 2**20
        shutil.rmtree(staging, ignore_errors=True)
        if full:
            free = shutil.disk_usage(out.parent).free
            raise OutputError(
                f"--out: the disk holding {out.parent} filled up during the export ({format_bytes(free)} free once "
                "its temporary files were removed; it needs about twice the 16-bit model); nothing was written"
            ) from None
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(staging, ignore_errors=True)
    report.seconds = round(time.monotonic() - started, 1)
    return report


def publish_file(path: Path, out: Path) -> None:
    if out.exists() or out.is_symlink():  # checked before the merge; something created it since
        raise OutputError(f"--out: {out} was created by something else during the export; it is left as it was")
    os.rename(path, out)


def check_export_request(adapter_dir: Path, out: Path, format: str, dtype: str, base: Optional[str]) -> str:
    """The base to merge into; every flag, the architecture and the tokenizer checked from their
    config files, before anything is loaded or written."""
    from transformers import AutoConfig

    if importlib.util.find_spec("gguf") is None:
        raise ConfigError("export: needs llama.cpp's gguf package: pip install 'qlora[export]' (or pip install gguf)")
    if format not in EXPORT_FORMATS:
        raise ConfigError(f"--format: {format!r} is not one of {', '.join(EXPORT_FORMATS)}")
    if dtype not in GGUF_DTYPES:
        raise ConfigError(f"--dtype: {dtype!r} is not one of {', '.join(GGUF_DTYPES)}")
    if format == "gguf" and out.suffix != ".gguf":
        raise ConfigError(f"--out: {out} should be a FILE.gguf for --format gguf")
    check_output(out, new_file=format == "gguf")
    base = resolve_base([("export", adapter_dir)], base)
    try:
        config = AutoConfig.from_pretrained(base)
    except (OSError, ValueError) as error:
        raise ModelError(f"--base: cannot read the config of {base}: {str(error).splitlines()[0]}") from None
    arch = gguf_architecture(config)
    tokenizer_dir = Path(tokenizer_source(adapter_dir, base))
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise ModelError(f"--format gguf: {tokenizer_dir} has no tokenizer.json (a fast tokenizer is needed)")
    read_vocabulary(tokenizer_dir, arch.vocab_size)
    check_free_space(base, out, dtype)
    return base


def check_free_space(base: str, out: Path, dtype: str) -> None:
    """The merged 16-bit model and the GGUF sit side by side until the merge is removed: refuse
    a disk without room for both (from the base's safetensors headers) before writing either."""
    import math

    layout = tensor_layout(base_shards(resolve_base_dir(base)))
    merged = sum(2 * math.prod(stored.shape) for stored in layout.values())
    need = int(merged * (1 + GGUF_SIZE_RATIO[dtype]))
    free = shutil.disk_usage(out.parent).free
    if free < need:
        raise OutputError(
            f"--out: {out.parent} has {format_bytes(free)} free; the export needs about {format_bytes(need)} "
            f"(the merged 16-bit model, {format_bytes(merged)}, beside the {dtype} GGUF)"
        )


def read_back(report: ExportReport, merged_dir: Path, gguf_path: Path, prompts: tuple[str, ...]) -> None:
    """The GGUF through transformers' GGUF loader vs the merged folder, both in float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged_tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    gguf_tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    samples = list(prompts) + [
        merged_tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        for prompt in prompts[:1]
        if merged_tokenizer.chat_template
    ]
    report.same_token_ids = all(
        merged_tokenizer(text)["input_ids"] == gguf_tokenizer(text)["input_ids"] for text in samples
    )
    input_ids = tokenize_prompts(merged_tokenizer, prompts)
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32)
    expected = all_logits(merged, input_ids)
    config = {}
    if gguf_architecture(merged.config).rope_type == "llama3":
        # transformers' GGUF reader drops llama3 rope scaling (llama.cpp reads it from rope_freqs):
        # the GGUF's weights are compared under the merged model's config.
        config = {"config": merged.config}
        report.notes += (
            "read back with the merged model's config: transformers' GGUF reader drops llama3 rope scaling",
        )
    del merged
    read = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32, **config
    )
    report.max_logit_diff = max_difference(all_logits(read, input_ids), expected)
    report.max_abs_logit = max(logits.abs().max().item() for logits in expected)
    report.checked = True
    if not report.same_token_ids:
        import transformers

        # Not refused: transformers rebuilds a tokenizer from the GGUF's fields by its own rules
        # (5.17's reader loses Llama 3's split regex and sentencepiece spacing); llama.cpp reads the
        # fields itself, and tests/test_llama_cpp.py holds that side.
        report.notes += (
            f"transformers {transformers.__version__}'s GGUF reader tokenizes some prompts differently from "
            "the model's tokenizer; check the GGUF with llama.cpp (llama-tokenize) before serving it",
        )


def finish_ollama(report: ExportReport, merged_dir: Path, folder: Path, gguf_name: str, out: Path, name: str) -> None:
    from qlora.adapters.ollama import modelfile

    text, notes = modelfile(gguf_name, merged_dir)
    report.modelfile = str(out / "Modelfile")
    report.ollama_command = f"ollama create {ollama_name(name)} -f {out.resolve() / 'Modelfile'}"
    report.notes += tuple(notes)
    (folder / "Modelfile").write_text(text)
    (folder / "qlora_export.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    apply_umask(folder)
    if out.is_dir():
        out.rmdir()  # empty (checked before the merge): replaced by the complete folder
    os.rename(folder, out)


def ollama_name(name: str) -> str:
    """Ollama model names are lower case letters, digits, '-', '_' and '.'."""
    cleaned = "".join(character if character.isalnum() or character in "-_." else "-" for character in name.lower())
    return cleaned.strip("-.") or "qlora-model"


def merge_line(merge: dict) -> str:
    if merge.get("max_diff_vs_16bit_adapter") is None:
        return "merge: logits not compared (a large base; qlora merge --check compares them)"
    line = f"merge: max |logit difference| vs 16-bit base + adapter {merge['max_diff_vs_16bit_adapter']:.4g}"
    if merge.get("max_diff_vs_nf4_adapter") is not None:
        line += f", vs NF4 base + adapter (training's) {merge['max_diff_vs_nf4_adapter']:.4g}"
    return line


def describe_export(report: ExportReport) -> str:
    lines = [
        f"exported: {report.gguf} ({format_bytes(report.bytes)}, {report.dtype}, {report.tensors} tensors, "
        f"llama.cpp architecture {report.architecture}, {report.tokenizer} tokenizer) in {report.seconds:.1f} s",
        merge_line(report.merge),
    ]
    if report.checked:
        lines.append(
            f"read back by transformers' GGUF loader: max |logit difference| vs the merged model "
            f"{report.max_logit_diff:.4g} (largest |logit| {report.max_abs_logit:.3g}); token ids "
            f"{'identical' if report.same_token_ids else 'DIFFER'}"
        )
    if report.format == "ollama":
        lines += [f"Modelfile: {report.modelfile}", f"import it: {report.ollama_command}"]
    lines.append(f"llama.cpp: llama-cli -m {report.gguf} -cnv")
    lines += [f"note: {note}" for note in report.notes]
    if report.vllm:
        from qlora.adapters.vllm_check import describe_verdict

        lines.append(describe_verdict(VllmVerdict(**report.vllm)))
    return "\n".join(lines)
