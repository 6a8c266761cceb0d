"""The comparison fixture: a ~25M-parameter Llama (HF folder + tokenizer) and a chat data set.

The model is random-init (no hub here) with the demo's byte-level tokenizer, so a token is a
byte and row lengths are easy to control. Every linear layer's input size is a multiple of 64:
bitsandbytes' CPU 4-bit kernels need it. The rows ask to repeat a list of words in capitals;
the word count is log-uniform, so rows run from ~50 to ~470 tokens (median ~110), most of them short (the mix
that makes padding expensive and packing pay).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

# hidden 512, 8 layers, MLP 1536, 8 heads of 64 with 4 KV heads: 25.4M parameters.
MODEL_SHAPE = dict(
    hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4
)
WORDS = [
    "alpha",
    "river",
    "stone",
    "cloud",
    "maple",
    "tiger",
    "ocean",
    "pixel",
    "amber",
    "delta",
    "lemon",
    "north",
    "quartz",
    "violet",
    "ember",
    "falcon",
    "harbor",
    "island",
    "jungle",
    "kettle",
    "lantern",
    "meadow",
    "nickel",
    "orbit",
]


def build_model(directory: Path, seed: int = 0, max_seq_len: int = 512, **shape) -> Path:
    """A random-weight Llama saved as a real HF folder (safetensors + tokenizer with a chat template)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora.demo.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(model_max_length=max_seq_len)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=max_seq_len,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        **{**MODEL_SHAPE, **shape},
    )
    for size in (config.hidden_size, config.intermediate_size):  # inputs of q/k/v/o/gate/up and of down
        if size % 64:
            raise ValueError(
                f"linear input size {size} is not a multiple of 64 (bitsandbytes CPU 4-bit kernels need it)"
            )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))
    return directory


def build_arch_model(directory: Path, arch: str, seed: int = 0, max_seq_len: int = 512) -> Path:
    """A random-weight copy of a shipped architecture (configs/arch/<arch>: its every shape, its
    vocabulary and head) with the byte-level tokenizer, whose ids all lie inside that vocabulary.
    Built on the GPU in bfloat16 when there is one: an 8B model is 16 GB there, 32 GB and minutes
    as a float32 CPU model. TRL loads a base from weights only, so this one is written out."""
    import torch
    from transformers import AutoModelForCausalLM

    from qlora.demo.tokenizer import build_tokenizer
    from qlora.plan.architecture import load_hf_config, resolve_config_dir

    tokenizer = build_tokenizer(model_max_length=max_seq_len)
    config = load_hf_config(resolve_config_dir(arch))
    config.eos_token_id, config.pad_token_id, config.bos_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id, None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))
    return directory


def parameter_count(directory: Path) -> int:
    from safetensors import safe_open

    total = 0
    for shard in sorted(directory.glob("*.safetensors")):  # a large model is written in shards
        with safe_open(str(shard), framework="pt") as handle:
            total += sum(math.prod(handle.get_slice(name).get_shape()) for name in handle.keys())
    return total


def chat_rows(count: int, seed: int, max_words: int = 32) -> list[dict]:
    """Rows whose word count is log-uniform in [1, max_words]: many short rows, a long tail."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        words = [rng.choice(WORDS) for _ in range(int(math.exp(rng.uniform(0, math.log(max_words + 1)))))]
        text = " ".join(words)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"Repeat in capitals: {text}"},
                    {"role": "assistant", "content": text.upper()},
                ]
            }
        )
    return rows


def write_rows(path: Path, rows: list[dict]) -> Path:
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path


def build_fixture(
    folder: Path, train_rows: int, eval_rows: int, seed: int = 0, max_seq_len: int = 512, arch=None, **shape
) -> dict:
    """Model folder + train.jsonl + eval.jsonl (disjoint seeds) in `folder`; returns their paths.
    `arch`: a configs/arch name whose shape the model takes instead of MODEL_SHAPE."""
    folder.mkdir(parents=True, exist_ok=True)
    if arch:
        model_dir = build_arch_model(folder / "model", arch, seed=seed, max_seq_len=max_seq_len)
    else:
        model_dir = build_model(folder / "model", seed=seed, max_seq_len=max_seq_len, **shape)
    train = write_rows(folder / "train.jsonl", chat_rows(train_rows, seed=seed + 1))
    held_out = write_rows(folder / "eval.jsonl", chat_rows(eval_rows, seed=seed + 2))
    return {
        "model": str(model_dir),
        "train": str(train),
        "eval": str(held_out),
        "parameters": parameter_count(model_dir),
    }
