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
from tests.tiny_rule_pairs import rule_prompts, write_mixed_demonstrations, write_rule_pairs

DEMO = Path(__file__).resolve().parent.parent / "qlora" / "demo" / "model"


def greedy_follows_rule(adapter: Path, prompts: list[tuple[str, str]]) -> float:
    model, tokenizer = load_with_adapters([("adapter", adapter)])
    pairs = [(prompt_ids(tokenizer, text, chat=True), answer) for text, answer in prompts]
    return exact_match_pairs(model, tokenizer, pairs, max_new_tokens=16).score


@pytest.mark.slow
def test_dpo_from_the_sft_adapter_follows_the_rule_more_often_than_sft_alone(tmp_path):
    sft_dir, dpo_dir = tmp_path / "sft", tmp_path / "dpo"
    sft_dir.mkdir(), dpo_dir.mkdir()
    seen = write_mixed_demonstrations(sft_dir / "train.jsonl", 256, seed=0)
    seen |= write_rule_pairs(dpo_dir / "train.jsonl", 256, seed=1, exclude=frozenset(seen))
    write_rule_pairs(dpo_dir / "eval.jsonl", 64, seed=2, exclude=frozenset(seen))
    (sft_dir / "eval.jsonl").write_text((sft_dir / "train.jsonl").read_text().split("\n", 32)[-1])
    shared = dict(lora={"r": 16, "alpha": 32, "dropout": 0.0}, data={"max_seq_len": 128})
    train = {"micro_batch_size": 16, "learning_rate": 2e-3, "warmup_steps": 2}
    sft_job = write_job(sft_dir, DEMO, **shared, train={**train, "max_steps": 30})
    run_job(load_config(sft_job), echo=lambda line: None)
    sft_adapter = sft_dir / "out"
    dpo_job = write_job(
        dpo_dir,
        DEMO,
        model={"name_or_path": str(DEMO), "adapter": str(sft_adapter), "reference_adapter": str(sft_adapter)},
        **shared,  # the adapter's own r and alpha: a lora key that disagreed would be refused
        train={**train, "objective": "dpo", "max_steps": 20},
    )
    run_job(load_config(dpo_job), echo=lambda line: None)

    held_out = rule_prompts(dpo_dir / "eval.jsonl")
    after_sft = greedy_follows_rule(sft_adapter, held_out)
    after_dpo = greedy_follows_rule(dpo_dir / "out", held_out)
    print(f"greedy answers that follow the rule: SFT {after_sft:.1%}, SFT then DPO {after_dpo:.1%}")
    assert after_dpo >= after_sft + 0.2 and after_dpo >= 0.8
