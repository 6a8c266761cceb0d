"""`qlora eval` on preference pairs: the base alone vs the base + each adapter, on the same pairs.

For every model, a pair's chosen and rejected answers are scored by their summed log-prob, with
the same per-sequence machinery DPO trains with (qlora.training.preference.answer_log_probs) on
the same padding-free pair batches (qlora.data.pairs), so on a job's eval file the numbers are the
ones its final eval wrote to metrics.jsonl (`eval_logps/...`, `eval_rewards/...`). Keys follow
metrics.jsonl's names:
- logps/accuracy: share of pairs whose chosen answer has the higher log-prob (the model's own
  preference; no reference), logps/margin: the mean of chosen minus rejected;
- rewards/* (adapters only): DPO's implicit reward, beta x (adapter - base) log-prob per answer,
  the base with the adapter switched off as reference, exactly as DPO training uses it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from qlora import data
from qlora.adapters.loading import (
    inference_tokenizer,
    load_with_adapters,
    resolve_base,
    select_adapter,
    tokenizer_source,
)
from qlora.config import TrainSection, validate


def dpo_beta(beta: Optional[float]) -> float:
    """--beta checked as train.dpo_beta is; absent: that key's default (the schema holds it)."""
    return validate({} if beta is None else {"dpo_beta": beta}, source="--beta", schema=TrainSection).dpo_beta


def evaluate_pairs(
    adapters: list[tuple[str, Path]],
    data_path: str,
    *,
    base: Optional[str] = None,
    bits: Optional[int] = None,
    max_seq_len: int = 2048,
    batch_size: int = 8,
    beta: Optional[float] = None,
    echo: Callable[[str], None] = print,
) -> dict:
    """{"kind": "preference", "pairs", "beta", "results": [{"model", "logps/accuracy", ...}, ...]}
    for the base first, then each adapter. Every row is read and checked before a model loads."""
    import torch

    from qlora.training.preference import answer_log_probs

    beta = dpo_beta(beta)
    base = resolve_base(adapters, base)
    tokenizer = inference_tokenizer(base, tokenizer_source(adapters[0][1], base))
    rows = data.read_rows([(data_path, "preference")], key="--data", objective="dpo")
    tokenized = data.tokenize_pairs(rows, tokenizer, max_seq_len, "truncate")
    batches = data.epoch_pair_batches(
        tokenized.examples, batch_size, tokenizer.pad_token_id, seed=0, epoch=0, shuffle=False
    )

    model, _ = load_with_adapters(adapters, base=base, bits=bits)
    device = next(model.parameters()).device

    @torch.no_grad()
    def scored() -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) summed answer log-probs of every pair, in file order."""
        sums = torch.cat([answer_log_probs(model, batch, device)[0].double().cpu() for batch in batches])
        return sums[0::2], sums[1::2]

    results = []
    reference = None
    for name in [None, *(name for name, _ in adapters)]:
        select_adapter(model, name)
        chosen, rejected = scored()
        result = {
            "model": name or "base",
            "logps/accuracy": (chosen > rejected).double().mean().item(),
            "logps/margin": (chosen - rejected).mean().item(),
            "logps/chosen": chosen.mean().item(),
            "logps/rejected": rejected.mean().item(),
        }
        if reference is None:
            reference = chosen, rejected
        else:
            chosen_reward, rejected_reward = beta * (chosen - reference[0]), beta * (rejected - reference[1])
            result.update(
                {
                    "rewards/accuracy": (chosen_reward > rejected_reward).double().mean().item(),
                    "rewards/margin": (chosen_reward - rejected_reward).mean().item(),
                    "rewards/chosen": chosen_reward.mean().item(),
                    "rewards/rejected": rejected_reward.mean().item(),
                }
            )
        echo(f"{result['model']}: preference accuracy {100 * result['logps/accuracy']:.1f}%")
        results.append(result)
    stats = tokenized.stats
    return {
        "kind": "preference",
        "data": str(data_path),
        "rows": stats["rows"],
        "pairs": stats["kept"],
        "truncated": stats["truncated"],
        "dropped": stats["dropped_no_supervision_after_truncation"],
        "answer_tokens": stats["supervised_tokens"],
        "beta": beta,
        "results": results,
    }


def describe_pairs(report: dict) -> str:
    skipped = f", {report['dropped']} dropped (an answer cut off by --max-seq-len)" if report["dropped"] else ""
    lines = [
        f"{report['data']}: {report['pairs']} pairs{skipped}, {report['answer_tokens']:,} answer tokens; "
        f"rewards: beta {report['beta']:g} x log-ratio against the base",
        f"{'model':<24} {'pref. accuracy':>14} {'logp margin':>12} {'reward acc.':>12} {'reward margin':>14}",
    ]
    for result in report["results"]:
        has_rewards = "rewards/accuracy" in result
        lines.append(
            f"{result['model']:<24} {100 * result['logps/accuracy']:>13.1f}% {result['logps/margin']:>12.4f} "
            + (
                f"{100 * result['rewards/accuracy']:>11.1f}% {result['rewards/margin']:>14.4f}"
                if has_rewards
                else f"{'-':>12} {'-':>14}"
            )
        )
    return "\n".join(lines)
