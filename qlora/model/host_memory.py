"""Host memory a loaded base keeps without needing it: the checkpoint file's mapping.

transformers reads safetensors through a memory map, and a tensor loaded in the dtype it was
saved in is a view into that map rather than a copy. Quantizing writes every 4-bit/8-bit
weight to fresh memory, but the layers left unquantized (embeddings, norms, the head) stay views,
and one small view keeps the WHOLE file mapped: every page the quantizer read stays in the
process's resident set. Measured on bench/compare.py's fixture (a 25M-parameter Llama, 97 MB
float32 checkpoint): 96 MiB of RSS for ~1 MiB of live tensors, through all of training.
Copying those few tensors lets the map close. Linux only (it reads /proc/self/maps); elsewhere,
and on CUDA (the weights live on the device), nothing is a view into the file and nothing moves.
"""

from __future__ import annotations

from pathlib import Path


def file_mapped_ranges(maps: Path = Path("/proc/self/maps")) -> list[tuple[int, int]]:
    """[start, end) of every address range mapped from a file, or [] where /proc is missing."""
    try:
        lines = maps.read_text().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            start, end = (int(address, 16) for address in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def release_checkpoint_file(model) -> int:
    """Copy the model's CPU parameters and buffers that are views into a mapped file, so the
    mapping can close; returns the bytes copied. Values are unchanged (a copy, bit for bit).

    Call it only on a quantized base: there the views are the small unquantized remainder. In a
    16-bit base every weight is a view, and copying them all would double memory while it runs.
    """
    ranges = file_mapped_ranges()
    if not ranges:
        return 0

    def in_file(tensor) -> bool:
        address = tensor.data_ptr()
        return tensor.device.type == "cpu" and any(start <= address < end for start, end in ranges)

    copied, seen, copies = 0, set(), {}
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if id(parameter) not in seen and in_file(parameter):
                parameter.data = parameter.data.clone()  # the same Parameter: tied weights stay tied
                copied += parameter.nbytes
            seen.add(id(parameter))
        for name, buffer in module.named_buffers(recurse=False):
            if id(buffer) not in copies and in_file(buffer):
                copies[id(buffer)] = buffer.clone()
                copied += buffer.nbytes
            if id(buffer) in copies:  # a buffer shared by several modules is copied once
                module._buffers[name] = copies[id(buffer)]
    return copied


# glibc's mallopt parameter number (malloc.h).
M_MMAP_THRESHOLD = -3
LARGE_BLOCK_BYTES = 4 * 1024 * 1024


def keep_large_blocks_out_of_the_heap(threshold: int = LARGE_BLOCK_BYTES) -> bool:
    """Serve blocks of `threshold` bytes or more with their own mmap, returned to the OS when
    freed; returns whether the setting took (glibc on Linux only; elsewhere nothing changes).

    Why: glibc raises its mmap threshold to the size of each mmapped block freed (up to 32 MiB),
    so after the first few steps every activation lands in the heap, and a heap cannot shrink
    around the blocks still in use: a step whose rows are longer than any before (padding-free
    batches change length every step) grows it again. bench/compare.py's `ours` on a CPU, with
    the checkpoint mapping released too: peak RSS 1,163 to 1,392 MiB -> 970 to 1,029 MiB over 4
    runs each, same losses, ~1% more CPU time (BENCHMARKS.md). Below 4 MiB (the dequantized
    weights, most activations) the heap stays: every mmapped block is page-faulted in fresh, and
    a 1 MiB threshold cost 35% more CPU time per step, 128 KiB 79%.
    """
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return libc.mallopt(M_MMAP_THRESHOLD, threshold) == 1
