"""FSDP-QLoRA on CPU: two gloo processes (tests/fsdp_worker.py) against one process.

One torchrun launch does every check (a launch costs seconds on two cores); the single-process
references are computed here with the library's own single-GPU path (load_base: uint8 storage).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlora import data
from qlora.adapters import attach_lora
from qlora.config import ModelSection, QuantizationSection
from qlora.model.base import load_base, load_tokenizer, weight_bytes
from qlora.training.loss import summed_cross_entropy
from tests.fsdp_worker import CHUNK_TOKENS, LORA, STEPS
from tests.tiny import build_tiny_model, write_chat_data
from tests.tiny_adapters import plain_4bit_base

REPO = Path(__file__).resolve().parent.parent
WORLD = 2


def micro_batches(model_dir: Path, directory: Path, count: int) -> list:
    tokenizer = load_tokenizer(str(model_dir))
    path = write_chat_data(directory / "rows.jsonl", 4 * count, seed=1)
    examples = data.tokenize_rows(
        data.read_rows([(str(path), "auto")]), tokenizer, 64, "completions", "truncate"
    ).examples
    return list(data.epoch_batches(examples, 4, False, 64, tokenizer.pad_token_id, seed=0, epoch=0))[:count]


def single_process(model_dir: Path, compute_dtype: str = "float32"):
    base = load_base(
        ModelSection(name_or_path=str(model_dir)),
        QuantizationSection(bits=4, compute_dtype=compute_dtype),
        gradient_checkpointing=True,
    )
    return attach_lora(base, LORA, seed=0)


def logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        result = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    model.train()
    return result.float()


def reference_training(model, batches: list) -> list[float]:
    """One process, both ranks' micro-batches of a step in one accumulation window."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(STEPS):
        window = batches[step * WORLD : (step + 1) * WORLD]
        supervised = sum(batch.supervised_tokens for batch in window)
        total = 0.0
        for batch in window:
            loss_sum = summed_cross_entropy(model, batch, "cpu", CHUNK_TOKENS)
            (loss_sum / supervised).backward()
            total += float(loss_sum)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1e6)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total / supervised)
    return losses


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def fsdp_run(tiny_model_dir, tmp_path_factory):
    """The worker's per-rank reports, plus what it was handed."""
    out = tmp_path_factory.mktemp("fsdp")
    tied_dir = build_tiny_model(tmp_path_factory.mktemp("tied-model"), seed=3, tied=True)
    batches = micro_batches(tiny_model_dir, out, WORLD * STEPS)
    torch.save(batches, out / "batches.pt")
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={WORLD}",
        f"--master-port={free_port()}", str(REPO / "tests" / "fsdp_worker.py"),
        str(out), str(tiny_model_dir), str(tied_dir),
    ]  # fmt: skip
    environment = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-4000:]
    reports = [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]
    return {"reports": reports, "out": out, "batches": batches, "tied_dir": tied_dir}
