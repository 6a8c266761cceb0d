"""The tokenizer in a GGUF's metadata: vocabulary, token types, merges or scores, special tokens,
the chat template, and the pre-tokenizer name llama.cpp splits text by.

Two tokenizer families cover the shipped configs:
- byte-level BPE (`gpt2` in llama.cpp: Llama 3, Qwen2, the demo): tokens and merges as the
  tokenizer.json spells them; the split regex is looked up by name in configs/gguf.
- sentencepiece-style BPE with byte fallback (`llama`: Mistral 7B, Llama 2): llama.cpp merges by
  score, highest first, where transformers merges by merge rank, lowest first; each token's score
  is minus the rank of the merge that makes it, so both pick the same merges.
Special tokens, add_bos/add_eos and the chat template come from llama.cpp's own SpecialVocab.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from qlora.errors import ConfigError
from qlora.plan.architecture import CONFIGS_DIR

PRE_TOKENIZERS_FILE = CONFIGS_DIR / "gguf" / "pre_tokenizers.yaml"
BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


@dataclass
class GgufVocabulary:
    model: str
    """llama.cpp's tokenizer model: gpt2 (byte-level BPE) or llama (sentencepiece-style)."""
    pre: str | None
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    merges: list[str]
    adds_bos: bool = False
    """whether the tokenizer puts a BOS token before the text it encodes."""


def read_vocabulary(model_dir: Path, vocab_size: int) -> GgufVocabulary:
    """The vocabulary of the tokenizer saved in `model_dir`, padded to the embedding's rows."""
    from transformers import AutoTokenizer

    spec = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise ConfigError(f"--format gguf: a {model.get('type')} tokenizer is not exportable; BPE tokenizers are")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ConfigError(
            f"--format gguf: the tokenizer has ids up to {max(vocab.values())}, over the model's {vocab_size} rows"
        )
    merges = merge_strings(model.get("merges") or [])
    sentencepiece_style = bool(model.get("byte_fallback"))
    by_id = {index: token for token, index in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens = [by_id.get(index, f"[PAD{index}]") for index in range(vocab_size)]
    types = [
        token_type(index, tokens[index], index in by_id, added, sentencepiece_style) for index in range(vocab_size)
    ]
    encoded = tokenizer("a")["input_ids"]
    adds_bos = tokenizer.bos_token_id is not None and bool(encoded) and encoded[0] == tokenizer.bos_token_id
    if sentencepiece_style:
        return GgufVocabulary("llama", None, tokens, types, merge_rank_scores(tokens, merges), merges, adds_bos)
    pre = pre_tokenizer_name(spec.get("pre_tokenizer"), merges)
    return GgufVocabulary("gpt2", pre, tokens, types, None, merges, adds_bos)


def token_type(index: int, token: str, known: bool, added: dict, sentencepiece_style: bool) -> int:
    """llama.cpp's type of a token: rows past the tokenizer are UNUSED padding, added tokens CONTROL
    (special) or USER_DEFINED, sentencepiece's <0xNN> tokens BYTE, the rest NORMAL."""
    import gguf

    if not known:
        return gguf.TokenType.UNUSED
    if index in added:
        return gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED
    if sentencepiece_style and BYTE_TOKEN.match(token):
        return gguf.TokenType.BYTE
    return gguf.TokenType.NORMAL


def merge_strings(merges: list) -> list[str]:
    """tokenizer.json writes merges as "a b" or, since tokenizers 0.20, as [a, b] pairs."""
    return [merge if isinstance(merge, str) else " ".join(merge) for merge in merges]


def merge_rank_scores(tokens: list[str], merges: list[str]) -> list[float]:
    rank = {merge.replace(" ", ""): -float(position) for position, merge in reversed(list(enumerate(merges)))}
    lowest = -float(len(merges))
    return [rank.get(token, 0.0 if len(token) == 1 or BYTE_TOKEN.match(token) else lowest) for token in tokens]


def pre_tokenizer_name(pre_tokenizer: dict | None, merges: list[str]) -> str:
    """llama.cpp's name for how this tokenizer splits text before merging."""
    known = yaml.safe_load(PRE_TOKENIZERS_FILE.read_text()) or {}
    regex = split_regex(pre_tokenizer)
    if regex is None and byte_level_regex(pre_tokenizer):
        return "gpt-2"
    if regex is None:
        if merges:
            raise ConfigError("--format gguf: the tokenizer merges without a split regex, which llama.cpp cannot do")
        # With no merges every byte is its own token, however the text is split.
        return "default"
    for name, pattern in known.items():
        if pattern == regex:
            return name
    raise ConfigError(
        f"--format gguf: the tokenizer's split regex {regex[:60]!r}... is not one llama.cpp knows "
        f"(known: {', '.join(known)}; {PRE_TOKENIZERS_FILE})"
    )


def split_regex(pre_tokenizer: dict | None):
    for step in pre_steps(pre_tokenizer):
        if step.get("type") == "Split":
            pattern = step.get("pattern", {})
            return pattern.get("Regex", pattern.get("String"))
    return None


def byte_level_regex(pre_tokenizer: dict | None) -> bool:
    return any(step.get("type") == "ByteLevel" and step.get("use_regex", True) for step in pre_steps(pre_tokenizer))


def pre_steps(pre_tokenizer: dict | None) -> list[dict]:
    if not pre_tokenizer:
        return []
    return (
        pre_tokenizer.get("pretokenizers", [pre_tokenizer])
        if pre_tokenizer.get("type") == "Sequence"
        else [pre_tokenizer]
    )


def add_vocabulary(writer, model_dir: Path, vocabulary: GgufVocabulary) -> None:
    import gguf

    writer.add_tokenizer_model(vocabulary.model)
    if vocabulary.pre:
        writer.add_tokenizer_pre(vocabulary.pre)
    writer.add_token_list(vocabulary.tokens)
    writer.add_token_types(vocabulary.types)
    if vocabulary.scores is not None:
        writer.add_token_scores(vocabulary.scores)
    writer.add_key_value(
        gguf.Keys.Tokenizer.MERGES, vocabulary.merges, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.STRING
    )
    special = gguf.SpecialVocab(model_dir, load_merges=False, n_vocab=len(vocabulary.tokens))
    # Whether a BOS is added is what the tokenizer does, not what SpecialVocab guesses from its
    # post-processor. A tokenizer without a BOS (the demo's) still names one, never added: llama.cpp
    # otherwise takes id 11 as BOS, and transformers 5.17's GGUF reader needs the id.
    special.add_special_token["bos"] = vocabulary.adds_bos
    if "bos" not in special.special_token_ids and "eos" in special.special_token_ids:
        special.special_token_ids["bos"] = special.special_token_ids["eos"]
    special.add_to_gguf(writer, quiet=True)
