"""The comparison fixture: random-init Llamas (HF folders + tokenizers), a chat data set and its
preference pairs (bench/compare.py --objective dpo).

Two kinds of model, all random-init (no hub here), all with byte-level tokenizers, so a token is
a byte and row lengths are easy to control (and equal for every model: one data set serves all):

- REALISTIC (the default of bench/compare.py): a scaled copy of configs/arch/llama-2-7b with its
  32,000-entry vocabulary: hidden 576, MLP 1536, 24 layers, 9 heads of 64 (multi-head, as
  Llama 2), 114M parameters with a tied head, 132M untied. The tokenizer is the demo's byte-level
  one with reserved entries up to 32,000 (`build_tokenizer(vocab_size=...)`). Why not a trained 32k BPE: what the
  vocabulary costs a training step (the embedding, the head matmul, the softmax and loss over
  every entry, the head's weights and logits in memory) depends on its size, not on which
  strings the entries are; a byte-level tokenizer keeps the row lengths controlled and the same
  for the 32k and the byte-vocabulary models, so a row pair differs in the vocabulary alone; and
  no corpus is at hand to train a realistic 32k BPE on (the fixture's text has ~30 distinct words).
  Saved in bfloat16, as hub checkpoints are.
- MODEL_SHAPE: the earlier ~25M bench model (8 layers, 260-entry byte vocabulary), kept for the
  extra rows and bench/checkpointing_probe.py.

Every linear layer's input size is a multiple of 64: bitsandbytes' CPU 4-bit kernels need it.
The rows ask to repeat a list of words in capitals; the word count is log-uniform, so most rows
are short with a long tail (the mix that makes padding expensive and packing pay).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

REALISTIC_ARCH = "llama-2-7b"  # configs/arch: the architecture the realistic model scales down
REALISTIC_SHAPE = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=24,
    num_attention_heads=9,
    num_key_value_heads=9,
    head_dim=64,  # set, not derived: the loaded config already holds Llama 2's 4096 / 32
)
# The fixture's models by name (bench/compare.py's MODEL@ part): head tying and vocabulary size.
VARIANTS = {
    "tied": dict(tie_word_embeddings=True, vocab_size=32000),
    "untied": dict(tie_word_embeddings=False, vocab_size=32000),
    "byte": dict(tie_word_embeddings=True, vocab_size=None),  # the byte tokenizer's 260 entries
}
# hidden 512, 8 layers, MLP 1536, 8 heads of 64 with 4 KV heads: 25.4M parameters.
MODEL_SHAPE = dict(
    hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4
)
ROW_MARGIN = 40  # tokens beyond the two messages' bytes: ChatML's markers and roles, TRL's newline
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


def arch_config(arch: str, max_seq_len: int = 512, tokenizer_vocab=None, **overrides):
    """(config, tokenizer): a shipped architecture's config (configs/arch/<arch>: its every shape,
    its vocabulary and head, less `overrides`) and a byte-level tokenizer whose ids all lie inside
    that vocabulary (`tokenizer_vocab`: the tokenizer's size, by reserved entries; else the byte
    tokenizer's 260)."""
    from qlora.demo.tokenizer import build_tokenizer
    from qlora.plan.architecture import load_hf_config, resolve_config_dir

    tokenizer = build_tokenizer(model_max_length=max_seq_len, vocab_size=tokenizer_vocab or None)
    config = load_hf_config(resolve_config_dir(arch))
    for key, value in overrides.items():
        setattr(config, key, value)
    config.eos_token_id, config.pad_token_id, config.bos_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id, None
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"the tokenizer's {len(tokenizer)} ids do not fit {arch}'s vocabulary of {config.vocab_size}")
    return config, tokenizer


def variant_config(variant: str, max_seq_len: int = 512):
    """(config, tokenizer) of one of VARIANTS: the REALISTIC_SHAPE copy of REALISTIC_ARCH with that
    head and vocabulary."""
    from qlora.demo.tokenizer import build_tokenizer

    tie, vocab_size = VARIANTS[variant]["tie_word_embeddings"], VARIANTS[variant]["vocab_size"]
    overrides = dict(
        REALISTIC_SHAPE,
        tie_word_embeddings=tie,
        vocab_size=vocab_size or len(build_tokenizer()),
        max_position_embeddings=max(max_seq_len, 4096),
    )
    return arch_config(REALISTIC_ARCH, max_seq_len, tokenizer_vocab=vocab_size, **overrides)


def save_random_model(directory: Path, config, tokenizer, seed: int = 0) -> Path:
    """Random weights for `config`, saved with `tokenizer` as an HF folder. Built on the GPU in
    bfloat16 when there is one: an 8B model is 16 GB there, 32 GB and minutes as a float32 CPU
    model. Saved in bfloat16, as hub checkpoints are. TRL loads a base from weights only, so the
    model is written out."""
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    directory.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))
    return directory


def build_arch_model(directory: Path, arch: str, seed: int = 0, max_seq_len: int = 512) -> Path:
    """A random-weight copy of configs/arch/<arch> (bench/compare.py --arch, bench/gpu_proof.sh)."""
    return save_random_model(directory, *arch_config(arch, max_seq_len), seed=seed)


def build_variant(directory: Path, variant: str, seed: int = 0, max_seq_len: int = 512) -> Path:
    """A random-weight model of one of VARIANTS (bench/compare.py's tied, untied and byte)."""
    return save_random_model(directory, *variant_config(variant, max_seq_len), seed=seed)


def parameter_count(directory: Path) -> int:
    from safetensors import safe_open

    total = 0
    for shard in sorted(directory.glob("*.safetensors")):  # a large model is written in shards
        with safe_open(str(shard), framework="pt") as handle:
            total += sum(math.prod(handle.get_slice(name).get_shape()) for name in handle.keys())
    return total


def chat_rows(count: int, seed: int, max_words: int = 32, max_seq_len: int = 512) -> list[dict]:
    """Rows whose word count is log-uniform in [1, max_words]: many short rows, a long tail. A row
    longer than max_seq_len tokens (bytes, with the chat template's ~25 and TRL's trailing newline:
    a margin of ROW_MARGIN) is drawn again, so every run trains on every row whole."""
    rng = random.Random(seed)
    rows = []
    while len(rows) < count:
        words = [rng.choice(WORDS) for _ in range(int(math.exp(rng.uniform(0, math.log(max_words + 1)))))]
        text = " ".join(words)
        prompt = f"Repeat in capitals: {text}"
        if len(prompt) + len(text) + ROW_MARGIN > max_seq_len:
            continue
        rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": text.upper()}]})
    return rows


def preference_rows(count: int, seed: int, max_words: int = 32, max_seq_len: int = 512) -> list[dict]:
    """chat_rows as TRL's conversational preference pairs: the prompt's messages, the capitals as
    the chosen answer and the words as given as the rejected one (the same length, so a pair's two
    sequences cost the same and the preference is the rule alone). Every sequence fits max_seq_len."""
    pairs = []
    for row in chat_rows(count, seed, max_words=max_words, max_seq_len=max_seq_len):
        prompt, answer = row["messages"]
        rejected = prompt["content"].removeprefix("Repeat in capitals: ")
        pairs.append(
            {
                "prompt": [prompt],
                "chosen": [answer],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        )
    return pairs


def write_rows(path: Path, rows: list[dict]) -> Path:
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path


def build_data(
    folder: Path, train_rows: int, eval_rows: int, seed: int = 0, max_seq_len: int = 512, max_words: int = 32
) -> dict:
    """train.jsonl + eval.jsonl (disjoint seeds) in `folder`, every row within max_seq_len."""
    folder.mkdir(parents=True, exist_ok=True)
    train = write_rows(folder / "train.jsonl", chat_rows(train_rows, seed + 1, max_words, max_seq_len))
    held_out = write_rows(folder / "eval.jsonl", chat_rows(eval_rows, seed + 2, max_words, max_seq_len))
    return {"train": str(train), "eval": str(held_out)}


def build_pairs(
    folder: Path, train_rows: int, eval_rows: int, seed: int = 0, max_seq_len: int = 512, max_words: int = 32
) -> dict:
    """pairs-train.jsonl + pairs-eval.jsonl (the chat rows' seeds), every sequence within max_seq_len."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = {"train": (train_rows, seed + 1), "eval": (eval_rows, seed + 2)}
    return {
        split: str(
            write_rows(folder / f"pairs-{split}.jsonl", preference_rows(count, rng_seed, max_words, max_seq_len))
        )
        for split, (count, rng_seed) in rows.items()
    }


def build_fixture(
    folder: Path, train_rows: int, eval_rows: int, seed: int = 0, max_seq_len: int = 512, arch=None, **shape
) -> dict:
    """The small MODEL_SHAPE model (or `arch`: a configs/arch name whose shape it takes) + the data
    in `folder`; returns their paths."""
    if arch:
        model_dir = build_arch_model(folder / "model", arch, seed=seed, max_seq_len=max_seq_len)
    else:
        model_dir = build_model(folder / "model", seed=seed, max_seq_len=max_seq_len, **shape)
    data = build_data(folder, train_rows, eval_rows, seed=seed, max_seq_len=max_seq_len)
    return {"model": str(model_dir), **data, "parameters": parameter_count(model_dir)}
