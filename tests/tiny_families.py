"""Tiny random models of the families the shipped configs cover, each with a tokenizer of its
family's kind trained here (merges and all), as real HF folders:
- llama3: Llama with Llama 3.1's `llama3` rope scaling and a byte-level BPE split by Llama 3's regex;
- qwen2: Qwen2 (q/k/v biases, tied embeddings) with Qwen2's regex and a ChatML template;
- mistral: Mistral with a sentencepiece-style BPE (byte fallback, `▁` for spaces), as Mistral 7B's.
"""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_CHAT = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
MISTRAL_CHAT = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content']"
    " + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)
# Texts each family's tokenizer and model are compared on (plain text, digits, a newline).
PROMPTS = ("reverse abcdef", "The quick brown fox jumps over the lazy dog.", "Question: what is 12 + 30?\nAnswer:")
CORPUS = [
    "The quick brown fox jumps over the lazy dog 1234567 times.",
    "Question: what is 12 + 30?\nAnswer: 42",
    "def reverse(text):\n    return text[::-1]",
    "She said it's done, we'll see; they've gone and I'm here.",
] * 20


def pre_tokenizer_regex(name: str) -> str:
    return yaml.safe_load((REPO / "configs" / "gguf" / "pre_tokenizers.yaml").read_text())[name]


def byte_level_tokenizer(regex: str, specials: list[str], vocab_size: int, chat_template: str, **special_names):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=chat_template, **special_names)


def sentencepiece_style_tokenizer(vocab_size: int):
    """Llama 2 / Mistral 7B's tokenizer.json shape: <unk> <s> </s>, the 256 <0xNN> byte tokens,
    then learnt pieces; spaces as `▁`, a `▁` before the text, unknown characters as bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    learner = Tokenizer(models.BPE())
    # Mistral 7B v0.3's tokenizer.json: `▁` before the first piece of text only, not after a special token.
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    learner.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size - 259, special_tokens=[]))
    learnt = learner.get_vocab()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{byte:02X}>": 3 + byte for byte in range(256)}}
    for token in sorted(learnt, key=learnt.get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(merge) for merge in __import__("json").loads(learner.to_str())["model"]["merges"]]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.pre_tokenizer = learner.pre_tokenizer
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    from tokenizers import AddedToken

    backend.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in ("<unk>", "<s>", "</s>")]
    )
    from tokenizers.processors import TemplateProcessing

    backend.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        chat_template=MISTRAL_CHAT,
        add_bos_token=True,
    )


def build_family_model(directory: Path, family: str, seed: int = 0) -> Path:
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    shape = dict(
        vocab_size=384,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    if family == "llama3":
        tokenizer = byte_level_tokenizer(
            pre_tokenizer_regex("llama-bpe"),
            ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
            360,
            LLAMA3_CHAT,
            bos_token="<|begin_of_text|>",
            eos_token="<|eot_id|>",
        )
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # fmt: skip
        config = LlamaConfig(**shape, rope_parameters=rope, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id)  # fmt: skip
        model_class = LlamaForCausalLM
    elif family == "qwen2":
        tokenizer = byte_level_tokenizer(
            pre_tokenizer_regex("qwen2"), ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], 360, CHATML,
            eos_token="<|im_end|>", pad_token="<|endoftext|>",
        )  # fmt: skip
        config = Qwen2Config(**shape, tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id)
        model_class = Qwen2ForCausalLM
    elif family == "mistral":
        tokenizer = sentencepiece_style_tokenizer(360)
        config = MistralConfig(**shape, sliding_window=None, bos_token_id=1, eos_token_id=2)
        model_class = MistralForCausalLM
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = model_class(config)
    with torch.no_grad():  # random init leaves biases and norms at 0 / 1: spread them so a mixup shows
        for name, parameter in model.named_parameters():
            if parameter.dim() == 1:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))
    return directory
