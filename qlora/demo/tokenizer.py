"""The demo's tokenizer: byte-level, one token per byte, ChatML chat template.

A tokenizer with no merges needs no training corpus, covers every string, and keeps the
demo model tiny (260 tokens). It is a real `tokenizers` tokenizer saved as tokenizer.json, so
it loads through `AutoTokenizer.from_pretrained` like any hub tokenizer.
"""

from __future__ import annotations

from typing import Optional

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|pad|>"


def build_tokenizer(model_max_length: int = 512, vocab_size: Optional[int] = None):
    """A PreTrainedTokenizerFast: ids 0-3 are the special tokens, then the 256 bytes; with a
    `vocab_size`, reserved entries after them up to it (as Llama 3 reserves its
    <|reserved_special_token_N|>): in the BPE vocabulary, reachable by no merge, so a realistic
    vocabulary size costs tokenizing nothing (bench/fixture.py)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    if vocab_size is not None and vocab_size < len(vocab):
        raise ValueError(f"vocab_size {vocab_size} < the {len(vocab)} special and byte entries")
    for index in range((vocab_size or len(vocab)) - len(vocab)):
        vocab[f"<|reserved_{index}|>"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
    )
