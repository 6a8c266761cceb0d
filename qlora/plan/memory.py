"""Peak GPU memory and compute of a QLoRA job, from the model's shape alone: no weights, no GPU.

Every line of the breakdown is a formula over the architecture (qlora.plan.architecture) and plain
settings (qlora.plan.settings); each formula says why it has that form: qlora.plan.weights for what
is always resident, qlora.plan.activations for what a step adds. The per-layer activation count
was checked against the tensors autograd really saves on a tiny Llama (tests/test_plan.py, exact
in float32); the rest (logits, backward temporaries, allocator slack, CUDA context) is calibrated
by bench/plan_proof.py on a GPU. Here: the total, whether it fits, and the largest that does.

The peak of a step is reached in one of the phases that never overlap:
  loss:      every layer's checkpointed input is held while the vocab-sized logits, their
             float32 copy and log-softmax (and its gradient) exist;
  backward:  one decoder layer is recomputed with its full activations, its gradients flow, and
             the 4-bit weights of a linear are dequantized to the compute dtype for the matmul;
  reference: DPO only: after the policy's forward, before its backward, the same model with
             the adapter off runs under no_grad (one layer's working set at a time).
The total is what is always resident + the largest phase + allocator slack + context. A
preference micro-batch of P pairs is 2P sequences (settings.sequences_per_row): its activations
and logits are those of 2P SFT rows.
On N GPUs (settings.world_size) every number is one GPU's: qlora.plan.sharding says what DDP adds
to the resident lines and what FSDP divides; the phases are one micro-batch's on every rank.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Optional

from qlora.plan.activations import activation_lines
from qlora.plan.architecture import Architecture
from qlora.plan.flops import FlopModel
from qlora.plan.settings import Line, PlanSettings
from qlora.plan.sharding import per_gpu_lines, strategies_to_try
from qlora.plan.weights import (
    adapter_lines,
    base_weight_lines,
    lora_tensor_sizes,
    optimizer_state_bytes,
    paged_state_bytes,
)

# Caching-allocator slack (reserved - allocated) as a share of the peak: blocks freed between
# layers are reused but not returned; a first guess, to be calibrated by bench/plan_proof.py.
ALLOCATOR_SLACK = 0.05
# CUDA context, cuBLAS workspaces and bitsandbytes kernels: memory nvidia-smi shows that torch's
# allocator never reports. ~0.5 GiB on recent cards with torch 2.x.
CUDA_CONTEXT_BYTES = 512 * 2**20


@dataclass
class Plan:
    architecture: str
    settings: dict
    parameters: dict
    lines: list[Line]
    allocated_bytes: int  # peak of torch's allocator (compare with torch.cuda.max_memory_allocated)
    reserved_bytes: int  # + allocator slack (compare with torch.cuda.max_memory_reserved)
    total_bytes: int  # + CUDA context: what the card must hold
    paged_bytes: int  # paged optimizer state: in CUDA unified memory, outside torch's counters
    flops_per_token: float
    budget_bytes: Optional[int] = None
    fits: Optional[bool] = None
    suggestions: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        record = asdict(self)
        record["breakdown"] = record.pop("lines")
        return record


# --------------------------------------------------------------------------- the plan


def flops_per_token(arch: Architecture, settings: PlanSettings) -> float:
    """Training FLOPs per token of full seq_len sequences (qlora.plan.flops: useful FLOPs, DPO's
    reference forward included, + the forward that checkpointing recomputes); the loop's MFU
    counts the useful part by the same model."""
    return FlopModel.of(arch, sum(lora_tensor_sizes(arch, settings))).per_token(
        settings.seq_len, settings.gradient_checkpointing, settings.reference_forward
    )


def make_plan(
    arch: Architecture, settings: PlanSettings, budget_bytes: Optional[int] = None, suggest: bool = True
) -> Plan:
    static = per_gpu_lines(arch, settings, base_weight_lines(arch, settings) + adapter_lines(arch, settings))
    held, phases = activation_lines(arch, settings)
    largest = max(phases, key=lambda phase: sum(line.bytes for line in phase))  # ties: the first
    for phase in phases:
        for line in phase if phase is not largest else ():
            line.counted = False
            line.why += " [smaller phase: not part of the peak]"
    lines = static + held + [line for phase in phases for line in phase]
    # This GPU's optimizer state (FSDP shards it) times the share bitsandbytes really pages.
    state = next(line.bytes for line in static if line.name == "optimizer_state")
    total_state = optimizer_state_bytes(lora_tensor_sizes(arch, settings), settings.optimizer)
    paged = int(state * paged_state_bytes(arch, settings) / total_state) if total_state else 0
    allocated = sum(line.bytes for line in lines if line.counted) - paged
    slack = int(ALLOCATOR_SLACK * allocated)
    lines.append(
        Line(
            "allocator_slack",
            slack,
            f"caching allocator: reserved beyond allocated, ~{ALLOCATOR_SLACK:.0%} of the peak",
        )
    )
    lines.append(
        Line(
            "cuda_context", CUDA_CONTEXT_BYTES, "CUDA context + cuBLAS workspace + kernels (outside torch's allocator)"
        )
    )
    plan = Plan(
        architecture=arch.source,
        settings=asdict(settings),
        parameters={
            "total": arch.total_params,
            "quantized": arch.quantized_params,
            "dense": arch.dense_params,
            "lora": sum(lora_tensor_sizes(arch, settings)),
        },
        lines=lines,
        allocated_bytes=allocated,
        reserved_bytes=allocated + slack,
        total_bytes=allocated + slack + CUDA_CONTEXT_BYTES + paged,
        paged_bytes=paged,
        flops_per_token=flops_per_token(arch, settings),
        budget_bytes=budget_bytes,
    )
    if budget_bytes is not None:
        plan.fits = plan.total_bytes <= budget_bytes
        if suggest:
            plan.suggestions = suggestions(arch, settings, budget_bytes)
    return plan


def fits(arch: Architecture, settings: PlanSettings, budget_bytes: int) -> bool:
    return make_plan(arch, settings, budget_bytes, suggest=False).fits


def largest_micro_batch(arch: Architecture, settings: PlanSettings, budget_bytes: int, limit: int = 1024) -> int:
    """The largest micro-batch at settings.seq_len that fits (0 if not even one row does): sequences,
    or pairs of sequences for a preference job (settings.sequences_per_row 2)."""
    return largest_fitting(lambda value: fits(arch, replace(settings, micro_batch=value), budget_bytes), 1, limit)


def largest_seq_len(arch: Architecture, settings: PlanSettings, budget_bytes: int, step: int = 128) -> int:
    """The largest multiple of `step` up to the model's context that fits at settings.micro_batch."""
    steps = largest_fitting(
        lambda value: fits(arch, replace(settings, seq_len=value * step), budget_bytes),
        1,
        max(1, arch.max_positions // step),
    )
    return steps * step


def largest_fitting(test, low: int, high: int) -> int:
    """Binary search for the largest value in [low, high] passing a monotone test (0 if none)."""
    if not test(low):
        return 0
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if test(middle) else (low, middle - 1)
    return low


def suggestions(arch: Architecture, settings: PlanSettings, budget_bytes: int) -> dict:
    without = replace(settings, gradient_checkpointing=False)
    found = {
        "largest_micro_batch": largest_micro_batch(arch, settings, budget_bytes),
        "largest_seq_len": largest_seq_len(arch, settings, budget_bytes),
        "fits_without_checkpointing": fits(arch, without, budget_bytes),
        "largest_micro_batch_without_checkpointing": largest_micro_batch(arch, without, budget_bytes),
    }
    if settings.bits == 4:  # selective checkpointing keeps 4-bit matmul outputs only
        found["fits_with_selective_checkpointing"] = fits(
            arch, replace(settings, gradient_checkpointing="selective"), budget_bytes
        )
    if not fits(arch, settings, budget_bytes):
        found["fits_on_gpus"] = fewest_gpus(arch, settings, budget_bytes)
    return found


def fewest_gpus(arch: Architecture, settings: PlanSettings, budget_bytes: int) -> Optional[dict]:
    """The fewest GPUs of budget_bytes each (and the strategy) on which the job fits, per GPU
    total included; None if no count `qlora plan` tries does."""
    for gpus, strategy in strategies_to_try(settings):
        plan = make_plan(arch, replace(settings, world_size=gpus, strategy=strategy), budget_bytes, suggest=False)
        if plan.fits:
            return {"gpus": gpus, "strategy": strategy, "per_gpu_bytes": plan.total_bytes}
    return None


def seconds_per_token(flops: float, tflops: float, utilization: float) -> float:
    return flops / (tflops * 1e12 * utilization)
