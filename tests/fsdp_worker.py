"""One rank of tests/test_fsdp.py, under `python -m torch.distributed.run --nproc-per-node 2`
(gloo, CPU): loads the tiny model sharded (rank 0 reads it; the others are handed a folder that
does not exist), then forward, shard sizes, training steps, the adapter saved and loaded back.
Each rank writes what it measured to <out>/rank<r>.pt; the test compares it with one process.

    fsdp_worker.py OUT MODEL_DIR TIED_MODEL_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from qlora.adapters import attach_lora
from qlora.adapters.lora import load_adapter_weights, save_adapter
from qlora.config import LoraSection, ModelSection, QuantizationSection
from qlora.model.sharded_load import four_bit_linears, load_sharded_base
from qlora.training.fsdp import (
    adapter_state_dict,
    load_adapter_state_dict,
    peft_model_of,
    shard_model,
)
from qlora.training.loop import clipped_gradients
from qlora.training.loss import summed_cross_entropy

STEPS = 3
CHUNK_TOKENS = 8  # several loss chunks per micro-batch: the head runs outside the forward, and in backward
LORA = LoraSection(r=8, alpha=16, dropout=0.0)
MISSING = "/nonexistent/rank-{rank}-never-reads-the-model"


def sharded(model_dir: str, compute_dtype: str, rank: int):
    """Only rank 0 is given the real folder: any read by another rank would fail."""
    source = ModelSection(name_or_path=model_dir if rank == 0 else MISSING.format(rank=rank))
    base = load_sharded_base(
        source, QuantizationSection(bits=4, compute_dtype=compute_dtype), gradient_checkpointing=True
    )
    return shard_model(attach_lora(base, LORA, seed=0))


def logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        result = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    model.train()
    return result.float()


def local_four_bit_bytes(model) -> int:
    """The bytes of the 4-bit weights this rank holds: with use_orig_params each weight outside
    the forward is a view of this rank's shard (empty where it lies in another rank's)."""
    return sum(module.weight.numel() * module.weight.element_size() for _, module in four_bit_linears(model))


def train_steps(model, batches: list, rank: int, world: int) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(STEPS):
        batch = batches[step * world + rank]
        supervised = torch.tensor(float(batch.supervised_tokens))
        dist.all_reduce(supervised)
        loss_sum = summed_cross_entropy(model, batch, "cpu", CHUNK_TOKENS)
        (loss_sum * world / supervised).backward()
        clipped_gradients(model, [p for p in model.parameters() if p.requires_grad], 1e6)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_loss = loss_sum.detach().clone()
        dist.all_reduce(step_loss)
        losses.append(float(step_loss / supervised))
    return losses


def main(out: Path, model_dir: str, tied_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    report = {}

    model = sharded(model_dir, "float32", rank)
    batches = torch.load(out / "batches.pt", weights_only=False)
    report["source"] = model_dir if rank == 0 else MISSING.format(rank=rank)
    report["logits_before"] = logits(model, batches[0])
    report["four_bit_bytes"] = local_four_bit_bytes(model)
    report["losses"] = train_steps(model, batches, rank, world)
    state = adapter_state_dict(model)
    report["adapter_state"] = state
    report["logits_after"] = logits(model, batches[0])
    if rank == 0:
        save_adapter(peft_model_of(model), out / "adapter", state_dict=state)
    dist.barrier()
    # Resume: scrambled weights, then the saved adapter loaded back into the wrapped model.
    load_adapter_state_dict(model, {name: torch.zeros_like(value) for name, value in state.items()})
    report["zeroed_state"] = adapter_state_dict(model)
    load_adapter_weights(model, out / "adapter")
    report["reloaded_state"] = adapter_state_dict(model)

    tied = sharded(tied_dir, "float32", rank)
    report["tied_logits"] = logits(tied, batches[0])
    report["tied_loss"] = float(summed_cross_entropy(tied, batches[0], "cpu", CHUNK_TOKENS).detach())

    bf16 = sharded(model_dir, "bfloat16", rank)
    report["bf16_logits"] = logits(bf16, batches[0])
    torch.save(report, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
