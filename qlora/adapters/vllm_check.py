"""Whether vLLM's LoRA path serves an adapter, and the `vllm serve` line that does.

The rules are vLLM's, read in its source (vllm/lora/peft_helper.py `PEFTHelper.validate_legal`
and `_validate_features`, vllm/config/lora.py `LoRAConfig`):
- `use_dora` is refused ("vLLM does not yet support DoRA");
- `modules_to_save` must be empty ("vLLM only supports modules_to_save being None");
- `bias` other than "none" needs `--enable-lora-bias`, which recent releases dropped;
- the rank must not exceed `--max-lora-rank`, one of 1, 8, 16, 32, 64, 128, 256, 320, 512 (16 by
  default), so the line names the smallest that fits;
- LoRA on the embedding or the head (trained embeddings/heads) is not served by its LoRA layers.
rsLoRA is served (vLLM scales by alpha / sqrt(r) when `use_rslora` is set).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
DEFAULT_MAX_LORA_RANK = 16
EMBEDDING_MODULES = ("embed_tokens", "lm_head", "wte", "embed_in", "embed_out", "output")


@dataclass
class VllmVerdict:
    served: bool
    reasons: list[str] = field(default_factory=list)
    max_lora_rank: int = DEFAULT_MAX_LORA_RANK
    command: str = ""


def vllm_verdict(adapter_config: dict, adapter_dir: Path, name: str = "") -> VllmVerdict:
    reasons = []
    if adapter_config.get("peft_type", "LORA") != "LORA":
        reasons.append(f"peft_type {adapter_config.get('peft_type')}: vLLM serves LoRA adapters only")
    if adapter_config.get("use_dora"):
        reasons.append("DoRA (use_dora): vLLM does not serve DoRA adapters; merge it instead (qlora merge)")
    if adapter_config.get("modules_to_save"):
        reasons.append(
            f"modules_to_save {adapter_config['modules_to_save']}: vLLM serves no fully trained modules; "
            "merge the adapter instead"
        )
    if adapter_config.get("bias", "none") != "none":
        reasons.append(f"bias {adapter_config['bias']!r}: vLLM serves LoRA adapters without trained biases")
    targets = adapter_config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    embedding_targets = [target for target in targets if target.split(".")[-1] in EMBEDDING_MODULES]
    if embedding_targets:
        reasons.append(
            f"LoRA on {', '.join(embedding_targets)}: vLLM serves LoRA on linear layers, not embeddings/heads"
        )
    ranks = [
        int(adapter_config.get("r", 8)),
        *(int(rank) for rank in (adapter_config.get("rank_pattern") or {}).values()),
    ]
    rank = max(ranks)
    fitting = [choice for choice in MAX_LORA_RANKS if choice >= max(rank, DEFAULT_MAX_LORA_RANK)]
    if not fitting:
        reasons.append(f"rank {rank}: over vLLM's largest --max-lora-rank {MAX_LORA_RANKS[-1]}")
    max_lora_rank = fitting[0] if fitting else MAX_LORA_RANKS[-1]
    base = adapter_config.get("base_model_name_or_path") or "BASE"
    name = name or Path(adapter_dir).resolve().name or "adapter"
    command = f"vllm serve {base} --enable-lora --lora-modules {name}={Path(adapter_dir).resolve()}"
    if max_lora_rank != DEFAULT_MAX_LORA_RANK:
        command += f" --max-lora-rank {max_lora_rank}"
    return VllmVerdict(not reasons, reasons, max_lora_rank, command if not reasons else "")


def read_verdict(adapter_dir: Path) -> VllmVerdict:
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    return vllm_verdict(config, adapter_dir)


def describe_verdict(verdict: VllmVerdict) -> str:
    if verdict.served:
        return (
            f"vLLM: served by its LoRA path (rank fits --max-lora-rank {verdict.max_lora_rank}):\n  {verdict.command}"
        )
    return "vLLM: not served by its LoRA path:\n" + "\n".join(f"  - {reason}" for reason in verdict.reasons)
