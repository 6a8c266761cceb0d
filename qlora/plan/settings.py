"""What the arithmetic takes (PlanSettings, from a job config at the edge) and gives back per
line of the breakdown (Line)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from qlora.config import DataSection, LoraSection, QuantizationSection, TrainSection

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}

# train.gradient_checkpointing auto (the schema's default) is a choice, not a mode the arithmetic
# can plan: qlora.plan.checkpointing_mode makes it against a memory budget. Without a budget the
# plan takes full checkpointing, the mode that needs the least memory, as auto would when nothing
# faster fits.
AUTO_WITHOUT_BUDGET = True

# What one micro-batch row is, per train.objective: (sequences it holds, whether each step also
# runs a reference forward). A preference pair is its chosen and its rejected sequence, end to end
# in the one padding-free forward (qlora.data.pairs); DPO also scores both with the adapter
# switched off, under no_grad (qlora.training.preference); ORPO needs no reference.
OBJECTIVE_PASSES = {"sft": (1, False), "dpo": (2, True), "orpo": (2, False)}


def default(section, key: str):
    """The schema's default of `key`: written once, there."""
    return section.model_fields[key].default


@dataclass(frozen=True)
class PlanSettings:
    """Plain arguments the arithmetic needs (built from a JobConfig at the edge); each default is
    the job schema's, read from it, so a plan of a bare setting is a plan of the default job
    (whose gradient_checkpointing auto, without a budget, plans AUTO_WITHOUT_BUDGET)."""

    micro_batch: int = default(TrainSection, "micro_batch_size")  # a number: auto is planned one size at a time
    seq_len: int = default(DataSection, "max_seq_len")
    gradient_checkpointing: Union[bool, str] = AUTO_WITHOUT_BUDGET  # True, False or "selective"; never "auto"
    grad_accum_steps: int = default(TrainSection, "grad_accum_steps")
    bits: Optional[int] = default(QuantizationSection, "bits")
    double_quant: bool = default(QuantizationSection, "double_quant")
    compute_dtype: str = default(QuantizationSection, "compute_dtype")
    lora_r: int = default(LoraSection, "r")
    target_modules: Union[str, tuple[str, ...]] = default(LoraSection, "target_modules")
    lora_dropout: float = default(LoraSection, "dropout")
    use_dora: bool = default(LoraSection, "use_dora")
    optimizer: str = default(TrainSection, "optimizer")
    # A CUDA dropout mask is one byte per element; on CPU it has the activation's dtype.
    dropout_mask_bytes: int = 1
    loss_chunk_tokens: Union[int, str] = default(TrainSection, "loss_chunk_tokens")  # a number, auto or off
    # GPUs the job runs on (torchrun's WORLD_SIZE): a property of the launch, not of the job file,
    # so it has no schema key; with more than one every number is per GPU (qlora.plan.sharding).
    world_size: int = 1
    strategy: str = default(TrainSection, "distributed")  # ddp or fsdp: what N > 1 GPUs do
    # Sequences of up to seq_len tokens per micro-batch row: 2 for a preference pair (chosen and
    # rejected in one forward), so micro_batch counts pairs and a step sees 2 x micro_batch sequences.
    sequences_per_row: int = OBJECTIVE_PASSES[default(TrainSection, "objective")][0]
    # DPO: a forward of the same model with the adapter off, under no_grad, between the policy's
    # forward and its backward: its FLOPs and its transient working set (it saves nothing).
    reference_forward: bool = OBJECTIVE_PASSES[default(TrainSection, "objective")][1]

    def __post_init__(self):
        if self.gradient_checkpointing == "auto":
            raise ValueError("gradient_checkpointing auto is resolved before planning (qlora.plan.checkpointing_mode)")


@dataclass
class Line:
    name: str
    bytes: int
    why: str
    counted: bool = True  # False: shown for comparison, not part of the peak (the smaller phase)


def settings_from_job(config, micro_batch: Optional[int] = None) -> PlanSettings:
    """PlanSettings from a JobConfig (micro_batch overrides train.micro_batch_size, e.g. when it is auto;
    gradient_checkpointing auto not yet resolved is planned as AUTO_WITHOUT_BUDGET)."""
    train, lora, quant = config.train, config.lora, config.quantization
    batch = (
        micro_batch
        if micro_batch is not None
        else (train.micro_batch_size if isinstance(train.micro_batch_size, int) else 1)
    )
    sequences_per_row, reference_forward = OBJECTIVE_PASSES[train.objective]
    return PlanSettings(
        micro_batch=batch,
        seq_len=config.data.max_seq_len,
        gradient_checkpointing=(
            AUTO_WITHOUT_BUDGET if train.gradient_checkpointing == "auto" else train.gradient_checkpointing
        ),
        grad_accum_steps=train.grad_accum_steps,
        bits=quant.bits,
        double_quant=quant.double_quant,
        compute_dtype=quant.compute_dtype,
        lora_r=lora.r,
        target_modules=lora.target_modules if isinstance(lora.target_modules, str) else tuple(lora.target_modules),
        lora_dropout=lora.dropout,
        use_dora=lora.use_dora,
        optimizer=train.optimizer,
        loss_chunk_tokens=train.loss_chunk_tokens,
        strategy=train.distributed,
        sequences_per_row=sequences_per_row,
        reference_forward=reference_forward,
    )
