"""Prompts in, tokens out: prompt files, chat-template rendering, seeded (greedy by default) decoding."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from qlora.data import turn_terminators
from qlora.data.formats import apply_template
from qlora.data.sources import read_records
from qlora.errors import ConfigError, DataError

PROMPT_KEYS = ("prompt", "expected", "adapter", "id")


@dataclass(frozen=True)
class Prompt:
    text: str
    source: str
    """The prompt file, or "argument" for a prompt given on the command line."""
    line: int = 0
    expected: Optional[str] = None
    adapter: Optional[str] = None
    """Which loaded adapter answers this row ("base" = none); None = the default one."""
    id: Optional[object] = None

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}" if self.line else self.source


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 0.0
    """0 = greedy decoding."""
    top_p: float = 1.0
    seed: int = 0

    def check(self) -> None:
        if self.max_new_tokens <= 0:
            raise ConfigError(f"--max-new-tokens: must be positive, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"--temperature: must be 0 (greedy) or positive, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p: must be in (0, 1], got {self.top_p}")


def read_prompts(path: str, adapters: Optional[set] = None) -> list[Prompt]:
    """Rows {"prompt", "expected"?, "adapter"?, "id"?} of a .jsonl/.json/.csv/.parquet file,
    each checked (file:line errors) before any model is loaded."""
    if not Path(path).is_file():
        raise DataError(f"prompt file not found: {path}")
    records = read_records(path, "--file")
    if not records:
        raise DataError(f"{path}: no rows")
    prompts = []
    for line, fields in records:
        where = f"{path}:{line}"
        if not isinstance(fields, dict):
            raise DataError(f'{where}: a row must be an object like {{"prompt": "..."}}')
        unknown = sorted(set(fields) - set(PROMPT_KEYS))
        if unknown:
            raise DataError(f"{where}: unknown key {unknown[0]!r}; a prompt row has {', '.join(PROMPT_KEYS)}")
        for key in ("prompt", "expected", "adapter"):
            value = fields.get(key)
            if value is not None and not isinstance(value, str):
                raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
        if not fields.get("prompt"):
            raise DataError(f"{where}: missing or empty 'prompt'")
        adapter = fields.get("adapter")
        if adapter is not None and adapters is not None and adapter not in adapters:
            raise DataError(f"{where}: adapter {adapter!r} is not loaded (loaded: {', '.join(sorted(adapters))})")
        prompts.append(Prompt(fields["prompt"], path, line, fields.get("expected"), adapter, fields.get("id")))
    return prompts


def prompt_ids(tokenizer, text: str, chat: bool, where: str = "prompt") -> list[int]:
    """Token ids of a prompt: as written, or as a user turn of the chat template (ending with the
    assistant's generation prompt), the way chat training data is rendered."""
    if not chat:
        return tokenizer(text)["input_ids"]
    if tokenizer.chat_template is None:
        raise ConfigError("--chat: this tokenizer has no chat template")
    rendered = apply_template(tokenizer, [{"role": "user", "content": text}], True, where)
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


def generate(model, tokenizer, input_ids: list[int], sampling: Sampling, streamer=None) -> str:
    """The continuation of `input_ids` as text, stopping at any end-of-turn token.

    The seed is set before every prompt, so an answer depends only on (prompt, adapter, seed),
    not on which prompts came before it.
    """
    import torch
    from transformers import set_seed

    set_seed(sampling.seed)
    device = next(model.parameters()).device
    ids = torch.tensor([input_ids], device=device)
    options = dict(do_sample=False)
    if sampling.temperature > 0:
        options = dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
    with torch.no_grad():
        output = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=sampling.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=sorted(turn_terminators(tokenizer)),
            use_cache=True,
            streamer=streamer,
            **options,
        )
    return tokenizer.decode(output[0, len(input_ids) :], skip_special_tokens=True)


def text_streamer(tokenizer):
    """Prints tokens to stdout as they are produced (the prompt is not echoed)."""
    from transformers import TextStreamer

    return TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
