"""A safetensors file written one tensor at a time, so a shard never has to be whole in memory.

safetensors' own save_file takes every tensor of the file at once (and copies each into bytes
before writing): for a 5 GB shard that is 10 GB of host memory. The format is an 8-byte header
length, a JSON header of names, dtypes, shapes and byte offsets, then the tensors' bytes; every
shape and dtype is known from the plan before the first tensor is made, so the header is written
first and each tensor appended as soon as it exists, then freed.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

# safetensors' dtype names -> bytes per element.
ELEMENT_BYTES = {
    "F64": 8,
    "I64": 8,
    "U64": 8,
    "F32": 4,
    "I32": 4,
    "U32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "U16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
FLOAT_NAMES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
# torch dtype names -> safetensors', for what a checkpoint holds.
TORCH_NAMES = {
    "float64": "F64",
    "float32": "F32",
    "bfloat16": "BF16",
    "float16": "F16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
}


def tensor_bytes(dtype_name: str, shape: tuple[int, ...]) -> int:
    count = 1
    for extent in shape:
        count *= extent
    return count * ELEMENT_BYTES[dtype_name]


class TensorFileWriter:
    """Writes `entries` [(name, safetensors dtype name, shape)] to `path`, in that order, through
    write(name, tensor); close() checks that every tensor came."""

    def __init__(self, path: Path, entries: list[tuple[str, str, tuple[int, ...]]]):
        self.expected = list(entries)
        header, offset = {}, 0
        for name, dtype_name, shape in entries:
            size = tensor_bytes(dtype_name, shape)
            header[name] = {"dtype": dtype_name, "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        header["__metadata__"] = {"format": "pt"}
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self.handle = open(path, "wb")
        self.handle.write(struct.pack("<Q", len(encoded)) + encoded)
        self.written = 0

    def write(self, name: str, tensor) -> None:
        import torch

        expected_name, dtype_name, shape = self.expected[self.written]
        actual = TORCH_NAMES.get(str(tensor.dtype).removeprefix("torch."), str(tensor.dtype))
        if (name, actual, tuple(tensor.shape)) != (expected_name, dtype_name, tuple(shape)):
            raise ValueError(
                f"{self.handle.name}: got {name} {actual} {list(tensor.shape)}, "
                f"expected {expected_name} {dtype_name} {list(shape)}"
            )
        raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        self.handle.write(memoryview(raw))  # the tensor's own bytes: no copy
        self.written += 1

    def close(self) -> None:
        self.handle.close()
        if self.written != len(self.expected):
            raise ValueError(f"{self.handle.name}: {self.written} of {len(self.expected)} tensors written")

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        if kind is None:
            self.close()
        else:
            self.handle.close()
