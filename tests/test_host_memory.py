"""A loaded 4-bit base lets go of its checkpoint file's mapping (qlora/model/host_memory.py)."""

import gc
import shutil
from pathlib import Path

import pytest
import torch

from qlora.model.host_memory import release_checkpoint_file
from tests.tiny_adapters import plain_4bit_base
from tests.tiny_training import tiny_base

pytestmark = pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads /proc/self/maps (Linux)")


def mapped(path: Path) -> bool:
    return str(path.resolve()) in Path("/proc/self/maps").read_text()


def test_release_checkpoint_file_unmaps_the_file_and_keeps_the_numbers(tiny_model_dir, tmp_path):
    folder = Path(shutil.copytree(tiny_model_dir, tmp_path / "base"))  # a path no other test's model maps
    checkpoint = folder / "model.safetensors"
    base = plain_4bit_base(folder)  # what load_base gets from transformers, before it lets go of the file
    gc.collect()
    assert mapped(checkpoint), "transformers no longer keeps the file mapped: host_memory.py may be obsolete"
    inputs = torch.arange(1, 41).reshape(2, 20)
    base.eval()
    with torch.no_grad():
        before = base(input_ids=inputs).logits

    copied = release_checkpoint_file(base)
    gc.collect()

    assert not mapped(checkpoint)
    embedding, head = base.get_input_embeddings().weight, base.get_output_embeddings().weight
    assert copied >= embedding.nbytes + head.nbytes  # the unquantized rest was copied ...
    assert copied < checkpoint.stat().st_size  # ... and only that: the 4-bit layers were not views
    with torch.no_grad():
        assert torch.equal(base(input_ids=inputs).logits, before)
    assert release_checkpoint_file(base) == 0  # nothing left in the file

    del base
    gc.collect()
    trained_on = tiny_base(folder, gradient_checkpointing=False)
    gc.collect()
    assert not mapped(checkpoint)  # load_base lets go of the file itself, for every caller (train, eval, merge, bench)
    assert release_checkpoint_file(trained_on) == 0


HEAP_PROBE = """
import ctypes, sys
import torch
from qlora.model.host_memory import keep_large_blocks_out_of_the_heap


class Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost"
        )
    ]


libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Mallinfo2
if sys.argv[1] == "tamed":
    assert keep_large_blocks_out_of_the_heap()
big = torch.empty(16 << 20, dtype=torch.uint8)  # freeing a mmapped 16 MiB block raises glibc's threshold to 16 MiB
del big
before = libc.mallinfo2().hblkhd
block = torch.empty(6 << 20, dtype=torch.uint8)
print(libc.mallinfo2().hblkhd - before)
"""


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="a glibc malloc setting")
def test_large_blocks_get_their_own_mapping_only_when_tamed(tmp_path):
    """glibc alone puts a 6 MiB tensor in the heap once a larger block was freed; tamed, it gets
    its own mapping (returned to the OS when freed), whatever was freed before."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent

    def mmapped_growth(mode: str) -> int:
        result = subprocess.run(
            [sys.executable, "-c", HEAP_PROBE, mode],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=root,
            env=dict(os.environ, PYTHONPATH=str(root), GLIBC_TUNABLES=""),
        )
        assert result.returncode == 0, result.stderr
        return int(result.stdout.split()[-1])

    assert mmapped_growth("default") < 1 << 20
    assert mmapped_growth("tamed") >= 6 << 20
