"""Task metric: greedy-decode held-out prompts and compare with the reference answers."""

from __future__ import annotations

from dataclasses import dataclass

from qlora.data import Row, prompt_and_answer, turn_terminators


@dataclass
class ExactMatch:
    correct: int
    total: int
    samples: list[tuple[str, str, str]]  # (prompt text, reference, generated), a few for display

    @property
    def score(self) -> float:
        return self.correct / self.total if self.total else 0.0


def exact_match(
    model, tokenizer, rows: list[Row], max_new_tokens: int, batch_size: int = 32, keep: int = 3
) -> ExactMatch:
    """Share of rows whose greedy answer equals the reference exactly (after stripping whitespace)."""
    pairs = [prompt_and_answer(row, tokenizer) for row in rows]
    return exact_match_pairs(model, tokenizer, pairs, max_new_tokens, batch_size, keep)


def exact_match_pairs(
    model, tokenizer, pairs: list[tuple[list[int], str]], max_new_tokens: int, batch_size: int = 32, keep: int = 3
) -> ExactMatch:
    """exact_match over (prompt token ids, reference answer) pairs, however the prompts were rendered."""
    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    samples = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        # Left padding so every prompt ends right where generation starts.
        width = max(len(prompt) for prompt, _ in chunk)
        input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for index, (prompt, _) in enumerate(chunk):
            input_ids[index, width - len(prompt) :] = torch.tensor(prompt)
            attention_mask[index, width - len(prompt) :] = 1
        with torch.no_grad():
            generated = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=tokenizer.pad_token_id,
                # Stop at any end-of-turn token (Llama 3's <|eot_id|>), not only at EOS.
                eos_token_id=sorted(turn_terminators(tokenizer)),
            )
        for index, (prompt, reference) in enumerate(chunk):
            answer = tokenizer.decode(generated[index, width:], skip_special_tokens=True).strip()
            correct += answer == reference
            if len(samples) < keep:
                samples.append((tokenizer.decode(prompt), reference, answer))
    model.train(was_training)
    return ExactMatch(correct=correct, total=len(pairs), samples=samples)
