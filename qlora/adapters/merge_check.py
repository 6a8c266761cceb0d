"""The merge's logit check: the written folder against the unmerged base + adapter, twice.

Three models are loaded, one at a time and freed before the next, all on the CPU (a merge has
no use for a GPU, and a 70B fits no card unquantized): the merged folder as plain transformers
loads it, the 16-bit base + adapter (same dtype: the difference is the merge's rounding alone),
and, for an adapter trained on NF4, the NF4 base + adapter that training saw (the difference
adds the base's quantization error, or with through_nf4 removes it).

What it costs: the base's weights read three times and the model built three times, host memory
of about one model in the merge dtype (the NF4 one is a quarter of that), and a CPU forward of
each prompt per model: seconds for a 1B model, minutes and ~16 GB for an 8B, ~140 GB for a 70B.
So it runs by default only under CHECK_BY_DEFAULT_BYTES of base weights (`--check` forces it).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from qlora.config import QuantizationSection

CHECK_BY_DEFAULT_BYTES = 4 * 10**9  # about a 2B model in 16 bits: a CPU check of a minute or two


@dataclass(frozen=True)
class LogitCheck:
    max_diff_vs_16bit_adapter: float
    max_diff_vs_nf4_adapter: Optional[float]
    max_abs_logit: float


def check_merged_logits(
    merged_dir: Path,
    adapter_dir: Path,
    base: str,
    trained: QuantizationSection,
    tokenizer,
    *,
    dtype: str,
    prompts: tuple[str, ...],
    nf4_reference: bool,
    echo: Callable[[str], None],
) -> LogitCheck:
    import torch
    from transformers import AutoModelForCausalLM

    from qlora.adapters.loading import load_with_adapters

    adapters, quiet = [("merge", adapter_dir)], {"warn": lambda line: None, "on_cpu": True}
    input_ids = tokenize_prompts(tokenizer, prompts)
    echo(f"check: loading the merged folder on the CPU in {dtype}")
    merged_logits = logits_of(
        lambda: AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=getattr(torch, dtype)), input_ids
    )
    echo(f"check: loading {base} + adapter unmerged, in {dtype}")
    versus_16bit = max_difference(
        merged_logits,
        logits_of(lambda: load_with_adapters(adapters, base=base, bits=16, compute_dtype=dtype, **quiet)[0], input_ids),
    )
    versus_nf4 = None
    if nf4_reference:
        echo(f"check: loading the {trained.quant_type.upper()} base + adapter training saw")
        versus_nf4 = max_difference(
            merged_logits, logits_of(lambda: load_with_adapters(adapters, base=base, bits=4, **quiet)[0], input_ids)
        )
    return LogitCheck(versus_16bit, versus_nf4, max(logits.abs().max().item() for logits in merged_logits))


def tokenize_prompts(tokenizer, prompts: tuple[str, ...]) -> list:
    import torch

    return [torch.tensor([tokenizer(prompt)["input_ids"]]) for prompt in prompts]


def all_logits(model, input_ids_list: list) -> list:
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        return [model(input_ids=ids.to(device)).logits.float().cpu() for ids in input_ids_list]


def max_difference(first: list, second: list) -> float:
    return max((a - b).abs().max().item() for a, b in zip(first, second))


def logits_of(load: Callable[[], object], input_ids: list) -> list:
    """The logits of the model `load` builds; the model is gone on return, before the next is built."""
    model = load()
    logits = all_logits(model, input_ids)
    del model
    gc.collect()  # peft's wrappers hold reference cycles: free the weights now, not at some later collection
    return logits
