"""The loop's FlopMeter for a job: the model's FLOP coefficients (from its config, as `qlora
plan` reads them) and the measured peak of the device in the compute dtype."""

from __future__ import annotations

from typing import Callable, Optional

from qlora.plan.architecture import load_architecture
from qlora.plan.flops import FlopMeter, FlopModel
from qlora.plan.peak_flops import peak_matmul_flops


def job_flop_meter(
    name_or_path: str,
    lora_params: int,
    compute_dtype: str,
    trust_remote_code: bool = False,
    reference_forward: bool = False,
    head_positions: Optional[Callable] = None,
) -> FlopMeter:
    """reference_forward: DPO's, counted as useful FLOPs (the convention: qlora.plan.flops);
    head_positions: batch -> positions the loss's head projects, when not the supervised targets."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    arch = load_architecture(name_or_path, trust_remote_code)
    # Useful head FLOPs are those at supervised positions: the loss computes logits nowhere else.
    return FlopMeter(
        FlopModel.of(arch, lora_params),
        peak_matmul_flops(device, compute_dtype)["flops_per_s"],
        head_on_supervised_only=True,
        reference_forward=reference_forward,
        head_positions=head_positions,
    )
