"""The usual path, SFT then DPO: an SFT adapter trained on demonstrations that follow a rule only
half the time, then DPO started from it (model.adapter) against it (model.reference_adapter).
Greedy answers must follow the rule more often after DPO than the SFT-only adapter's do."""

from __future__ import annotations

from pathlib import Path

import pytest

from qlora.adapters.exact_match import exact_match_pairs
from qlora.adapters.generation import prompt_ids
from qlora.adapters.loading import load_with_adapters
from qlora.config import load_config
from qlora.job.run import run_job
from tests.tiny import write_job
from tests.tiny_rule_pairs import follows_rule, rule_prompts, write_mixed_demonstrations, write_rule_pairs

DEMO = Path(__file__).resolve().parent.parent / "qlora" / "demo" / "model"


def greedy_answers(adapter: Path, prompts: list[tuple[str, str, str]]) -> tuple[float, float]:
    """(share of greedy answers that follow the rule, share that are exactly the rule's answer)."""
    model, tokenizer = load_with_adapters([("adapter", adapter)])
    pairs = [(prompt_ids(tokenizer, text, chat=True), answer) for text, answer, _ in prompts]
    exact = exact_match_pairs(model, tokenizer, pairs, max_new_tokens=16, keep=len(pairs))
    following = [follows_rule(got, answer, copy) for (_, answer, copy), (_, _, got) in zip(prompts, exact.samples)]
    return sum(following) / len(prompts), exact.score


@pytest.mark.slow
def test_dpo_from_the_sft_adapter_follows_the_rule_more_often_than_sft_alone(tmp_path):
    """Measured on 64 held-out prompts: following the rule 23% after SFT, 81% after SFT then DPO
    (exactly the rule's answer: 8% -> 20%; the demo model often drops or swaps a letter)."""
    sft_dir, dpo_dir = tmp_path / "sft", tmp_path / "dpo"
    sft_dir.mkdir(), dpo_dir.mkdir()
    seen = write_mixed_demonstrations(sft_dir / "train.jsonl", 256, seed=0)
    seen |= write_rule_pairs(dpo_dir / "train.jsonl", 256, seed=1, exclude=frozenset(seen))
    write_rule_pairs(dpo_dir / "eval.jsonl", 64, seed=2, exclude=frozenset(seen))
    (sft_dir / "eval.jsonl").write_text((sft_dir / "train.jsonl").read_text().split("\n", 32)[-1])
    shared = dict(lora={"r": 16, "alpha": 32, "dropout": 0.0}, data={"max_seq_len": 128})
    train = {"micro_batch_size": 16, "warmup_steps": 2}
    sft_job = write_job(sft_dir, DEMO, **shared, train={**train, "max_steps": 30, "learning_rate": 2e-3})
    run_job(load_config(sft_job), echo=lambda line: None)
    sft_adapter = sft_dir / "out"
    dpo_job = write_job(
        dpo_dir,
        DEMO,
        model={"name_or_path": str(DEMO), "adapter": str(sft_adapter), "reference_adapter": str(sft_adapter)},
        **shared,  # the adapter's own r and alpha: a lora key that disagreed would be refused
        # A gentler rate than from the base: at 2e-3 DPO pushes away from the copies so hard that
        # the answers stop being either (the usual over-optimization; measured 8% -> 2% exact).
        train={**train, "objective": "dpo", "max_steps": 20, "learning_rate": 5e-4},
    )
    run_job(load_config(dpo_job), echo=lambda line: None)

    held_out = rule_prompts(dpo_dir / "eval.jsonl")
    sft_follows, sft_exact = greedy_answers(sft_adapter, held_out)
    dpo_follows, dpo_exact = greedy_answers(dpo_dir / "out", held_out)
    print(f"greedy answers following the rule: SFT {sft_follows:.1%}, SFT then DPO {dpo_follows:.1%}")
    print(f"exactly the rule's answer: SFT {sft_exact:.1%}, SFT then DPO {dpo_exact:.1%}")
    assert dpo_follows >= sft_follows + 0.3 and dpo_follows >= 0.6
    assert dpo_exact > sft_exact
