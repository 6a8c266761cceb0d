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
from qlora.model.base import load_base, load_tokenizer
from qlora.training.loss import summed_cross_entropy
from tests.fsdp_worker import CHUNK_TOKENS, LORA, STEPS, logits
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
            total += float(loss_sum.detach())
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


@pytest.fixture(scope="module")
def one_process(fsdp_run, tiny_model_dir):
    """The same checks in one process, through load_base (uint8 storage, no FSDP)."""
    from peft import get_peft_model_state_dict

    batches = fsdp_run["batches"]
    model = single_process(tiny_model_dir)
    before = logits(model, batches[0])
    losses = reference_training(model, batches)
    tied = single_process(fsdp_run["tied_dir"])
    four_bit_bytes = sum(
        module.weight.numel() * module.weight.element_size()
        for module in model.modules()
        if module.__class__.__name__ == "Linear4bit"
    )
    return {
        "logits_before": before,
        "losses": losses,
        "adapter_state": get_peft_model_state_dict(model),
        "logits_after": logits(model, batches[0]),
        "four_bit_bytes": four_bit_bytes,
        "tied_logits": logits(tied, batches[0]),
        "tied_loss": float(summed_cross_entropy(tied, batches[0], "cpu", CHUNK_TOKENS).detach()),
        "bf16_logits": logits(single_process(tiny_model_dir, "bfloat16"), batches[0]),
    }


def largest_difference(first: dict, second: dict) -> float:
    assert first.keys() == second.keys()
    return max(float((first[key].float() - second[key].float()).abs().max()) for key in first)


def test_sharded_forward_equals_one_process(fsdp_run, one_process):
    for report in fsdp_run["reports"]:
        assert torch.allclose(report["logits_before"], one_process["logits_before"], rtol=0, atol=1e-5)
        assert torch.allclose(report["tied_logits"], one_process["tied_logits"], rtol=0, atol=1e-5)
        # bf16 compute: 4-bit bytes stored as bf16, the same matmuls; a bf16 rounding apart at most
        assert torch.allclose(report["bf16_logits"], one_process["bf16_logits"], rtol=0, atol=1e-2)


def test_each_rank_holds_half_of_the_4bit_weights(fsdp_run, one_process):
    shares = [report["four_bit_bytes"] / one_process["four_bit_bytes"] for report in fsdp_run["reports"]]
    assert all(0.4 <= share <= 0.6 for share in shares), shares
    assert sum(shares) == pytest.approx(1.0)  # every byte on exactly one rank


def test_only_rank_0_reads_the_checkpoint(fsdp_run, one_process):
    """Rank 1 was handed a folder that does not exist, and still ends with rank 0's weights and
    quantization states: its logits are one process's (test_sharded_forward_equals_one_process)."""
    rank_0, rank_1 = fsdp_run["reports"]
    assert Path(rank_0["source"]).is_dir()
    assert not Path(rank_1["source"]).exists()
    assert torch.equal(rank_0["logits_before"], rank_1["logits_before"])


def test_sharded_training_equals_one_process(fsdp_run, one_process):
    for report in fsdp_run["reports"]:
        assert report["losses"] == pytest.approx(one_process["losses"], abs=1e-4)
        assert largest_difference(report["adapter_state"], one_process["adapter_state"]) <= 1e-4
        assert torch.allclose(report["logits_after"], one_process["logits_after"], rtol=0, atol=1e-4)
        # the chunked loss (head called outside the forward) on a tied head
        assert report["tied_loss"] == pytest.approx(one_process["tied_loss"], abs=1e-4)
    assert one_process["losses"][-1] < one_process["losses"][0] - 0.1  # the steps really trained


def test_adapter_loads_back_into_the_sharded_model(fsdp_run):
    """Resume: the shards zeroed, then load_adapter_weights put the saved adapter back."""
    for report in fsdp_run["reports"]:
        assert max(float(tensor.abs().max()) for tensor in report["zeroed_state"].values()) == 0.0
        assert largest_difference(report["reloaded_state"], report["adapter_state"]) == 0.0


def test_saved_adapter_loads_in_plain_peft(fsdp_run, tiny_model_dir):
    from peft import PeftModel

    model = PeftModel.from_pretrained(plain_4bit_base(tiny_model_dir), str(fsdp_run["out"] / "adapter"))
    plain = logits(model, fsdp_run["batches"][0])
    assert torch.allclose(plain, fsdp_run["reports"][0]["logits_after"], rtol=0, atol=1e-5)
    assert not torch.allclose(plain, fsdp_run["reports"][0]["logits_before"], rtol=0, atol=1e-3)  # it trained
