"""A merged 16-bit model folder -> one GGUF file, through llama.cpp's `gguf` package (its writer,
tensor-name maps and quantizers), one tensor in memory at a time.

The writer first declares every tensor's name, shape and type (read from the safetensors
headers, no data), writes the header and metadata, then streams each tensor: read from its
shard, transformed (gguf_arch), converted to the file's type, appended. The file grows at a
temporary name in the destination folder and is renamed into place only once complete, so a
kill or a full disk never leaves a truncated .gguf that looks finished.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from qlora.adapters.base_files import base_shards, tensor_layout
from qlora.adapters.gguf_arch import (
    GgufArchitecture,
    TensorNames,
    add_architecture_metadata,
    extra_tensors,
    gguf_architecture,
    transformed,
)
from qlora.adapters.gguf_vocab import add_vocabulary, read_vocabulary
from qlora.errors import ConfigError
from qlora.output_dir import apply_umask
from qlora.training.metrics import progress_bar

GGUF_DTYPES = ("f16", "bf16", "q8_0")
# The 16-bit dtype the merge writes for each GGUF type: q8_0 is quantized from bf16 (its own
# rounding, 8 bits per weight with a scale per 32, is far coarser than bf16's).
MERGE_DTYPE_FOR = {"f16": "float16", "bf16": "bfloat16", "q8_0": "bfloat16"}


@dataclass
class GgufReport:
    path: str
    dtype: str
    architecture: str
    tensors: int
    bytes: int
    tokenizer: str


def write_gguf(model_dir: Path, out: Path, dtype: str, name: str) -> GgufReport:
    """Write `model_dir` (config.json, safetensors, tokenizer) as one GGUF at `out`."""
    import gguf
    from transformers import AutoConfig

    if dtype not in GGUF_DTYPES:
        raise ConfigError(f"--dtype: {dtype!r} is not one of {', '.join(GGUF_DTYPES)}")
    arch = gguf_architecture(AutoConfig.from_pretrained(str(model_dir)))
    vocabulary = read_vocabulary(model_dir, arch.vocab_size)
    names = TensorNames(arch)
    plan = list(planned_tensors(model_dir, arch, names, dtype))

    handle, temp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(handle)
    temp = Path(temp_name)
    try:
        writer = writer_class(gguf)(temp, arch.gguf_name)
        writer.add_name(name)
        writer.add_file_type(file_types(gguf)[dtype])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_architecture_metadata(writer, arch)
        add_vocabulary(writer, model_dir, vocabulary)
        for tensor in plan:
            writer.add_tensor_info(tensor.gguf_name, tensor.shape, tensor.numpy_dtype, tensor.nbytes, tensor.raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with progress_bar(len(plan), "writing GGUF tensors") as bar:
            for data in tensor_data(model_dir, plan, arch):
                writer.write_tensor_data(data)
                bar.update(1)
        writer.close()
        apply_umask(temp)
        os.rename(temp, out)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return GgufReport(str(out), dtype, arch.gguf_name, len(plan), out.stat().st_size, vocabulary.model)


def writer_class(gguf):
    """gguf's writer, taking empty arrays too: llama.cpp refuses a byte-level vocabulary without
    the merges key, and the demo's vocabulary (every byte a token) has no merges; the GGUF format
    allows an empty array, only the writer's packing refuses one."""

    class Writer(gguf.GGUFWriter):
        def _pack_val(self, val, vtype, add_vtype, sub_type=None):
            if vtype == gguf.GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
                prefix = self._pack("I", vtype) if add_vtype else b""
                return prefix + self._pack("I", sub_type) + self._pack("Q", 0)
            return super()._pack_val(val, vtype, add_vtype, sub_type=sub_type)

    return Writer


def file_types(gguf) -> dict:
    return {
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }


@dataclass
class PlannedTensor:
    source: str
    """checkpoint name, or the GGUF name of a tensor computed here (rope_freqs)."""
    gguf_name: str
    shape: tuple
    """the logical shape, as numpy / the safetensors header have it (rows first)."""
    raw_dtype: object
    numpy_dtype: object
    nbytes: int
    shard: str = ""


def planned_tensors(model_dir: Path, arch: GgufArchitecture, names: TensorNames, dtype: str) -> Iterator[PlannedTensor]:
    for key, stored in tensor_layout(base_shards(model_dir)).items():
        gguf_name = names.gguf_name(key)
        if gguf_name is not None:
            yield planned(key, gguf_name, stored.shape, dtype, stored.shard.name)
    for gguf_name, tensor in extra_tensors(arch).items():
        yield planned(gguf_name, gguf_name, tuple(tensor.shape), "f32", "")


def planned(source: str, gguf_name: str, shape: tuple, dtype: str, shard: str) -> PlannedTensor:
    """llama.cpp's convention: 1-D tensors (norms, biases) stay float32; q8_0 needs rows of
    whole 32-value blocks, and a matrix that has none stays f16 as llama.cpp's converter does."""
    import gguf
    import numpy as np

    elements = int(np.prod(shape))
    if len(shape) == 1 or dtype == "f32":
        return PlannedTensor(source, gguf_name, shape, gguf.GGMLQuantizationType.F32, np.float32, elements * 4, shard)
    if dtype == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        kind = gguf.GGMLQuantizationType.Q8_0
        byte_shape = gguf.quant_shape_to_byte_shape(shape, kind)
        return PlannedTensor(source, gguf_name, byte_shape, kind, np.uint8, int(np.prod(byte_shape)), shard)
    if dtype == "bf16":
        return PlannedTensor(source, gguf_name, shape, gguf.GGMLQuantizationType.BF16, np.uint16, elements * 2, shard)
    return PlannedTensor(source, gguf_name, shape, gguf.GGMLQuantizationType.F16, np.float16, elements * 2, shard)


def tensor_data(model_dir: Path, plan: list[PlannedTensor], arch: GgufArchitecture) -> Iterator:
    """Each planned tensor's bytes, in plan order (the checkpoint's), one shard open at a time."""
    from safetensors import safe_open

    extras = extra_tensors(arch)
    # The plan follows the checkpoint's order, so each shard's tensors come together.
    for shard, tensors in itertools.groupby(plan, key=lambda tensor: tensor.shard):
        if not shard:
            yield from (extras[tensor.source].numpy() for tensor in tensors)
            continue
        with safe_open(str(model_dir / shard), framework="pt") as weights:
            for tensor in tensors:
                yield as_stored(transformed(tensor.source, weights.get_tensor(tensor.source), arch), tensor.raw_dtype)


def as_stored(value, raw_dtype):
    """A tensor as the GGUF stores it: float32, bf16 bits, float16 or q8_0 blocks."""
    import gguf
    import torch

    if raw_dtype == gguf.GGMLQuantizationType.F32:
        return value.float().numpy()
    if raw_dtype == gguf.GGMLQuantizationType.BF16:
        return value.to(torch.bfloat16).contiguous().view(torch.uint16).numpy()
    if raw_dtype == gguf.GGMLQuantizationType.F16:
        return value.to(torch.float16).contiguous().numpy()
    return gguf.quants.quantize(value.float().numpy(), raw_dtype)
