"""`qlora eval`: the base alone vs the base + each adapter, on the same rows, in one process.

Rows are either training rows (chat / alpaca / text, read and validated exactly like training
data), prompt rows `{"prompt", "expected"}`, or preference pairs (qlora.adapters.preference_eval:
preference accuracy, log-prob margin and DPO rewards instead of loss and exact match). Eval loss
is the mean cross-entropy per supervised token (the answers; for prompt rows, `expected` and the
EOS), computed by the same function training uses, so on a job's eval file it reproduces the
job's final eval loss. Exact match greedy-decodes every row that has an answer and compares it
with the reference, stripped.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional

from qlora import data
from qlora.adapters.exact_match import exact_match_pairs
from qlora.adapters.generation import prompt_ids, read_prompts
from qlora.adapters.loading import (
    inference_tokenizer,
    load_with_adapters,
    resolve_base,
    select_adapter,
    tokenizer_source,
)
from qlora.adapters.preference_eval import describe_pairs, evaluate_pairs
from qlora.data.preference import is_preference
from qlora.data.sources import read_records
from qlora.errors import ConfigError, DataError
from qlora.labels import IGNORE_INDEX
from qlora.training.loop import evaluate, safe_exp


def evaluate_adapters(
    adapters: list[tuple[str, Path]],
    data_path: str,
    *,
    base: Optional[str] = None,
    bits: Optional[int] = None,
    chat: bool = False,
    max_seq_len: int = 2048,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    data_format: str = "auto",
    beta: Optional[float] = None,
    echo: Callable[[str], None] = print,
) -> dict:
    """{"rows", "supervised_tokens", "exact_match_rows", "results": [{"model", "loss", "perplexity",
    "exact_match", "exact_correct"}, ...]} for the base first, then each adapter; preference rows
    (data_format preference, or auto on a file of pairs): evaluate_pairs' report."""
    if reads_pairs(data_path, data_format):
        return evaluate_pairs(
            adapters,
            data_path,
            base=base,
            bits=bits,
            max_seq_len=max_seq_len,
            batch_size=batch_size,
            beta=beta,
            echo=echo,
        )
    if beta is not None:
        raise ConfigError(f"--beta: DPO's reward is for preference rows, and {data_path} holds none")
    base = resolve_base(adapters, base)
    tokenizer = inference_tokenizer(base, tokenizer_source(adapters[0][1], base))
    examples, pairs = eval_rows(data_path, tokenizer, chat, max_seq_len, data_format)
    batches = data.epoch_batches(
        examples, batch_size, False, max_seq_len, tokenizer.pad_token_id, seed=0, epoch=0, shuffle=False
    )

    model, tokenizer = load_with_adapters(adapters, base=base, bits=bits)
    device = next(model.parameters()).device
    results = []
    for name in [None, *(name for name, _ in adapters)]:
        select_adapter(model, name)
        loss = evaluate(model, batches, device)
        result = {"model": name or "base", "loss": loss, "perplexity": safe_exp(loss)}
        if pairs:
            matched = exact_match_pairs(model, tokenizer, pairs, max_new_tokens, batch_size=batch_size)
            result.update(exact_match=matched.score, exact_correct=matched.correct)
        echo(
            f"{result['model']}: eval loss {loss:.4f}"
            + (f", exact match {result['exact_correct']}/{len(pairs)}" if pairs else "")
        )
        results.append(result)
    return {
        "data": str(data_path),
        "rows": len(examples),
        "supervised_tokens": sum(batch.supervised_tokens for batch in batches),
        "exact_match_rows": len(pairs),
        "results": results,
    }


def reads_pairs(path: str, data_format: str) -> bool:
    """Preference pairs: as --format says, or (auto) when the file's first row is one."""
    if data_format != "auto":
        return data_format == "preference"
    records = read_records(path, "--data") if Path(path).is_file() else []
    return bool(records) and is_preference(records[0][1])


def eval_rows(
    path: str, tokenizer, chat: bool, max_seq_len: int, data_format: str = "auto"
) -> tuple[list, list[tuple[list[int], str]]]:
    """(examples for the loss, (prompt ids, reference) pairs for exact match), every row checked."""
    records = read_records(path, "--data") if Path(path).is_file() and data_format == "auto" else []
    if records and isinstance(records[0][1], dict) and "prompt" in records[0][1]:
        return prompt_examples(path, tokenizer, chat, max_seq_len)
    rows = data.read_rows([(path, data_format)], key="--data")
    tokenized = data.tokenize_rows(rows, tokenizer, max_seq_len, "completions", "truncate")
    pairs = [data.prompt_and_answer(row, tokenizer) for row in rows if row.format != "text"]
    return tokenized.examples, pairs


def prompt_examples(path: str, tokenizer, chat: bool, max_seq_len: int) -> tuple[list, list]:
    """Prompt rows as examples supervised on `expected` + EOS, and as exact-match pairs."""
    examples, pairs = [], []
    for prompt in read_prompts(path):
        if not prompt.expected:
            raise DataError(f"{prompt.where}: missing or empty 'expected' (eval compares answers with it)")
        context = prompt_ids(tokenizer, prompt.text, chat, prompt.where)
        answer = tokenizer(prompt.expected, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        input_ids = (context + answer)[:max_seq_len]
        labels = ([IGNORE_INDEX] * len(context) + answer)[:max_seq_len]
        if all(label == IGNORE_INDEX for label in labels[1:]):
            raise DataError(f"{prompt.where}: the prompt alone fills --max-seq-len={max_seq_len}, so nothing is scored")
        row = data.Row(source=prompt.source, line=prompt.line, format="prompt", fields={})
        examples.append(
            data.Example(
                input_ids=input_ids, labels=labels, row=row, truncated=len(context) + len(answer) > max_seq_len
            )
        )
        pairs.append((context, prompt.expected.strip()))
    return examples, pairs


def describe_eval(report: dict) -> str:
    if report.get("kind") == "preference":
        return describe_pairs(report)
    lines = [
        f"{report['data']}: {report['rows']} rows, {report['supervised_tokens']:,} supervised tokens"
        + (f", exact match on {report['exact_match_rows']} rows" if report["exact_match_rows"] else ""),
        f"{'model':<24} {'eval loss':>10} {'perplexity':>12} {'exact match':>12}",
    ]
    for result in report["results"]:
        exact = f"{100 * result['exact_match']:.1f}%" if "exact_match" in result else "-"
        perplexity = result["perplexity"]
        shown = f"{perplexity:.3f}" if math.isfinite(perplexity) else "inf"
        lines.append(f"{result['model']:<24} {result['loss']:>10.4f} {shown:>12} {exact:>12}")
    return "\n".join(lines)
