"""Tiny real models and datasets for tests: real HF folders loaded through the same code path as a hub model.

Every linear layer's input size is a multiple of 64: the bitsandbytes CPU 4-bit kernels need it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import yaml


def build_tiny_model(
    directory: Path,
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    vocab: int = 320,
    tied: bool = False,
    shard_size: Optional[str] = None,
    dtype: str = "float32",
) -> Path:
    """shard_size: save as model-XXXXX-of-YYYYY.safetensors + index, each at most this big;
    dtype: the checkpoint's dtype (hub checkpoints are bfloat16)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora.demo.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=vocab,  # the demo tokenizer's 320 ids, or more rows in the embedding and head
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tied,  # tied: the head is the embedding matrix
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.to(getattr(torch, dtype)).save_pretrained(
        str(directory), safe_serialization=True, **({"max_shard_size": shard_size} if shard_size else {})
    )
    tokenizer.save_pretrained(str(directory))
    return directory


def chat_row(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def write_chat_data(path: Path, count: int, seed: int = 0) -> Path:
    """Rows of different lengths: reverse a word of 2-12 letters."""
    import random

    rng = random.Random(seed)
    with open(path, "w") as handle:
        for _ in range(count):
            word = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 12)))
            handle.write(json.dumps(chat_row(f"reverse {word}", word[::-1])) + "\n")
    return path


def write_job(directory: Path, model_dir: Path, **sections) -> Path:
    """A job YAML in `directory` with small defaults; keyword sections update the defaults."""
    job = {
        "model": {"name_or_path": str(model_dir)},
        "quantization": {"bits": 4, "compute_dtype": "float32"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": "train.jsonl", "eval": "eval.jsonl", "max_seq_len": 64},
        "train": {"max_steps": 4, "micro_batch_size": 4, "learning_rate": 1e-3, "optimizer": "adamw", "seed": 0},
        "output": {"dir": "out"},
    }
    for section, values in sections.items():
        job.setdefault(section, {}).update(values)
    if not (directory / "train.jsonl").exists():
        write_chat_data(directory / "train.jsonl", 32, seed=1)
        write_chat_data(directory / "eval.jsonl", 8, seed=2)
    path = directory / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path
