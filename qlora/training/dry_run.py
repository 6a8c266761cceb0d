"""One training step on synthetic tokens, for `train.micro_batch_size: auto` to measure.

qlora.plan.micro_batch picks the largest micro-batch the plan fits; on CUDA it confirms the pick
with the peak of one step here and steps down while it does not fit. The step is the loop's own
(qlora.training.loop): the loss is `summed_loss`, the chunked loss, under the loop's explicit
autocast and its activation offload, so the peak is the one training will reach, not the
full-vocabulary logits plus their float32 copy a plain `model(...).logits` cross-entropy would
allocate (~1.5 MB per token for Llama 3's 128k vocabulary). A preference job's step is the
loop's objective (qlora.training.preference) on a synthetic pair batch: the policy's forward and
backward over both sequences of every pair, and DPO's reference forward between them. The step
runs on any device, so the CPU tests check exactly what the GPU measures; only the peak reading
is CUDA's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from qlora.labels import IGNORE_INDEX
from qlora.training.loop import summed_loss
from qlora.training.offload import saved_for_backward_on_host
from qlora.training.precision import build_precision


@dataclass
class SyntheticBatch:
    """The fields of a data batch the loss reads (qlora.data.batching.Batch), made up."""

    input_ids: torch.LongTensor
    position_ids: torch.LongTensor
    targets: torch.LongTensor
    attention_mask: Optional[torch.LongTensor]
    supervised_tokens: int


@dataclass
class SyntheticPairBatch:
    """The fields of a preference batch the objectives read (qlora.data.pairs.PairBatch), made up."""

    input_ids: torch.LongTensor
    position_ids: torch.LongTensor
    targets: torch.LongTensor
    next_tokens: torch.LongTensor
    sequence_ids: torch.LongTensor
    attention_mask: None
    pairs: int
    supervised_tokens: int
    row_lengths: list[int]


def token_id_limit(model: torch.nn.Module, tokenizer_size: int) -> int:
    """One past the largest token id the step may draw: len(tokenizer) can exceed the embedding's
    rows (added tokens not resized into the model), and on CUDA an id past the last row is a
    device-side assert that poisons the whole context; the padded rows past len(tokenizer) are
    ids no data ever holds."""
    return min(tokenizer_size, model.get_input_embeddings().weight.shape[0])


def synthetic_batch(
    micro_batch: int, seq_len: int, token_limit: int, padding_free: bool, generator: torch.Generator
) -> SyntheticBatch:
    """micro_batch full sequences of seq_len random ids below token_limit, every target supervised
    (the most the loss can project). padding_free: end to end in ONE sequence, position ids
    restarting at each (the loop's default batches); else [micro_batch, seq_len] without padding."""
    input_ids = torch.randint(0, token_limit, (micro_batch, seq_len), generator=generator)
    position_ids = torch.arange(seq_len).expand(micro_batch, seq_len).contiguous()
    targets = torch.cat([input_ids[:, 1:], torch.full((micro_batch, 1), IGNORE_INDEX)], dim=1)
    if padding_free:
        input_ids, position_ids, targets = (tensor.reshape(1, -1) for tensor in (input_ids, position_ids, targets))
    return SyntheticBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        targets=targets,
        attention_mask=None,
        supervised_tokens=micro_batch * (seq_len - 1),
    )


def synthetic_pair_batch(pairs: int, seq_len: int, token_limit: int, generator: torch.Generator) -> SyntheticPairBatch:
    """`pairs` pairs as the loop's preference batches hold them: 2 x pairs sequences of seq_len
    random ids (chosen, rejected, chosen, ...) end to end in ONE padding-free sequence, every next
    token a target: the most the objective projects (ORPO's whole chosen sequence included)."""
    flat = synthetic_batch(2 * pairs, seq_len, token_limit, True, generator)
    return SyntheticPairBatch(
        input_ids=flat.input_ids,
        position_ids=flat.position_ids,
        targets=flat.targets,
        next_tokens=flat.targets.clone(),
        sequence_ids=torch.arange(2 * pairs).repeat_interleave(seq_len),
        attention_mask=None,
        pairs=pairs,
        supervised_tokens=flat.supervised_tokens,
        row_lengths=[seq_len] * (2 * pairs),
    )


def dry_run_step(
    model: torch.nn.Module,
    micro_batch: int,
    seq_len: int,
    tokenizer_size: int,
    device: torch.device,
    compute_dtype: str,
    chunk_tokens: Union[int, str] = "auto",
    padding_free: bool = True,
    offload_activations: bool = False,
    objective=None,
) -> float:
    """One forward + backward of the loop's loss at micro_batch x seq_len on `device`; returns the
    summed loss. `objective`: a preference job's (qlora.training.preference.PreferenceObjective,
    a fresh one), micro_batch then counting pairs of sequences; None: SFT's loss. Leaves no
    trace: gradients dropped, train/eval mode and every RNG restored (the ids come from their own
    generator; dropout and checkpointing draw from forked ones), the objective's readings drained."""
    precision = build_precision(compute_dtype, device.type)
    generator = torch.Generator().manual_seed(0)
    limit = token_id_limit(model, tokenizer_size)
    if objective is None:
        batch = synthetic_batch(micro_batch, seq_len, limit, padding_free, generator)
    else:
        batch = synthetic_pair_batch(micro_batch, seq_len, limit, generator)  # pair batches are padding-free
    was_training = model.training
    model.train()
    forked = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=forked):
            with saved_for_backward_on_host(offload_activations):
                with precision.autocast():
                    if objective is None:
                        loss = summed_loss(model, batch, device, chunk_tokens)
                    else:
                        objective.start_window([batch])
                        loss = objective.loss_sum(model, batch, device, chunk_tokens)
                loss.backward()
        return float(loss.detach())
    finally:
        loss = None
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        if objective is not None:
            objective.readings()


def cuda_dry_run_peak(
    model: torch.nn.Module, micro_batch: int, seq_len: int, tokenizer_size: int, **step
) -> Optional[int]:
    """Peak bytes torch's allocator held during dry_run_step on the current GPU (weights included,
    as they are resident), or None when it ran out of memory. The cache is emptied first, so the
    step starts from what is allocated, not from blocks an earlier phase left reserved."""
    device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    try:
        dry_run_step(model, micro_batch, seq_len, tokenizer_size, device, **step)
        return torch.cuda.max_memory_allocated(device)
    except torch.OutOfMemoryError:
        return None
    finally:
        torch.cuda.empty_cache()
