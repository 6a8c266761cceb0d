"""llama.cpp itself runs what `qlora export` writes (llama-cpp-python, built from its sdist).

Opt-in: skipped where llama_cpp is not installed; `.ci/run` builds and installs it (about 4 min on
2 cores), so under CI (CI=true) a missing llama_cpp fails instead.
"""

import json
import os

import numpy as np
import pytest
import torch

from qlora.cli.main import main
from tests.tiny_adapters import peft_merged, plain_peft_adapter
from tests.tiny_families import PROMPTS, build_family_model

if os.environ.get("CI") == "true":
    import llama_cpp  # noqa: F401 - .ci/run installs it; the tests must run there
llama_cpp = pytest.importorskip("llama_cpp")

HELD_OUT = 12  # demo eval prompts answered by both
# f16 rounds each merged weight once: llama.cpp's logits (f16 weights) vs peft's float32 merge.
F16_RELATIVE_TOLERANCE = 5e-3


def llama(path, **kwargs):
    return llama_cpp.Llama(model_path=str(path), n_ctx=512, verbose=False, seed=0, **kwargs)


def test_llama_cpp_answers_the_exported_demo_adapter_as_qlora_generate_does(demo_run, tmp_path):
    out = tmp_path / "demo.gguf"
    assert main(["export", "--adapter", str(demo_run), "--out", str(out)]) == 0
    rows = held_out_rows()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": row[0], "expected": row[1]}) + "\n" for row in rows))
    answers = {}
    for bits in ("16", "4"):
        written = tmp_path / f"generated-{bits}.jsonl"
        flags = ["--file", str(prompts), "--output", str(written), "--chat", "--bits", bits, "--max-new-tokens", "16"]
        assert main(["generate", "--adapter", str(demo_run), *flags]) == 0
        answers[bits] = [json.loads(line)["output"] for line in written.read_text().splitlines()]

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(demo_run))
    model = llama(out)
    try:
        served = []
        for prompt, _ in rows:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            assert model.tokenize(text.encode(), add_bos=False, special=True) == tokenizer(text)["input_ids"]
            result = model.create_completion(text, max_tokens=16, temperature=0.0, top_k=1)
            served.append(result["choices"][0]["text"])
    finally:
        model.close()
    assert served == answers["16"]  # the same 16-bit weights, merged or not: the same greedy answers
    assert sum(a == b for a, b in zip(served, answers["4"])) >= HELD_OUT - 2  # NF4 base + adapter, as trained
    assert sum(answer.strip() == expected for answer, (_, expected) in zip(served, rows)) >= HELD_OUT * 0.8


def held_out_rows() -> list:
    from pathlib import Path

    eval_file = Path(__file__).resolve().parent.parent / "qlora" / "demo" / "data" / "eval.jsonl"
    rows = [json.loads(line)["messages"] for line in eval_file.read_text().splitlines()[:HELD_OUT]]
    return [(messages[0]["content"], messages[1]["content"]) for messages in rows]


@pytest.mark.parametrize("family", ["llama3", "qwen2", "mistral"])
def test_llama_cpp_reads_each_family_with_the_merged_logits_and_token_ids(tmp_path, family):
    """llama.cpp applies what transformers' reader cannot check: Llama 3.1's rope_freqs, Qwen2's
    biases and tied head, the sentencepiece-style vocabulary's scores."""
    from transformers import AutoTokenizer

    base = build_family_model(tmp_path / "base", family)
    adapter = plain_peft_adapter(base, tmp_path / "adapter")
    out = tmp_path / "model.gguf"
    assert main(["export", "--adapter", str(adapter), "--out", str(out), "--no-check"]) == 0
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    reference = peft_merged(base, adapter)
    model = llama(out, logits_all=True)
    try:
        for text in PROMPTS:
            ids = tokenizer(text)["input_ids"]
            add_bos = tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id
            assert model.tokenize(text.encode(), add_bos=add_bos, special=True) == ids, text
            model.reset()
            model.eval(ids)
            served = np.array(model.scores[: len(ids)])
            with torch.no_grad():
                expected = reference(input_ids=torch.tensor([ids])).logits[0].numpy()
            assert np.abs(served - expected).max() / np.abs(expected).max() < F16_RELATIVE_TOLERANCE, text
    finally:
        model.close()
