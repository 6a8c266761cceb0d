"""Preference rows (TRL's formats): validation and rendering of a pair's two sequences.

Three shapes, as TRL's DPOTrainer reads them:
- {"prompt": str, "chosen": str, "rejected": str}: plain text, no chat template; each answer
  ends with a supervised EOS, as an alpaca row without a template does;
- {"prompt": [messages], "chosen": [assistant messages], "rejected": [...]}: the chat template
  renders prompt + answer; the answer's span holds its end-of-turn token;
- {"chosen": [messages], "rejected": [messages]}: the implicit prompt, the messages both share
  from the start; what follows (starting with an assistant turn) is each side's answer.

A pair renders to two Renderings (prompt + chosen, prompt + rejected), supervised on the answer
only; tokenize.py labels them exactly as it labels SFT rows.
"""

from __future__ import annotations

from typing import Any

from qlora.data.formats import (
    Rendering,
    apply_template,
    render_chat,
    require_object,
    type_name,
    validate_messages,
)
from qlora.errors import DataError

SIDES = ("chosen", "rejected")
SHAPES = '{"prompt", "chosen", "rejected"} (strings or message lists) or {"chosen": [...], "rejected": [...]}'


def is_preference(fields: Any) -> bool:
    return isinstance(fields, dict) and "chosen" in fields and "rejected" in fields


def validate_preference(fields: Any, where: str) -> None:
    """Raise DataError naming `where` for a row that is not a usable preference pair."""
    require_object(fields, where)
    if not is_preference(fields):
        raise DataError(f"{where}: not a preference row; expected {SHAPES}")
    prompt = fields.get("prompt")
    chosen, rejected = fields["chosen"], fields["rejected"]
    if isinstance(prompt, str) or (prompt is None and isinstance(chosen, str)):
        for side in SIDES:
            if not isinstance(fields[side], str):
                raise DataError(f"{where}: {side!r} must be a string like 'prompt', got {type_name(fields[side])}")
            if not fields[side].strip():
                raise DataError(f"{where}: {side!r} is empty")
        if prompt is None or not prompt.strip():
            raise DataError(f"{where}: 'prompt' is missing or empty (string pairs need one)")
    else:
        if prompt is not None and not isinstance(prompt, list):
            raise DataError(f"{where}: 'prompt' must be a string or a list of messages, got {type_name(prompt)}")
        for side in SIDES:
            value = fields[side]
            if not isinstance(value, list):
                raise DataError(f"{where}: {side!r} must be a list of messages, got {type_name(value)}")
            if not value:
                raise DataError(f"{where}: {side!r} is empty")
        _, answers = split_conversation(fields, where)
        for side, answer in zip(SIDES, answers):
            validate_messages({"messages": answer}, f"{where} ({side})")
    if chosen == rejected:
        raise DataError(f"{where}: 'chosen' and 'rejected' are identical, so there is no preference to learn")


def split_conversation(fields: dict, where: str) -> tuple[list[dict], tuple[list[dict], list[dict]]]:
    """(the prompt's messages, (chosen's answer messages, rejected's)) of a message-list pair."""
    if fields.get("prompt") is not None:
        prompt = list(fields["prompt"])
        answers = (list(fields["chosen"]), list(fields["rejected"]))
    else:
        chosen, rejected = fields["chosen"], fields["rejected"]
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, answers = list(chosen[:shared]), (list(chosen[shared:]), list(rejected[shared:]))
        if not prompt or not answers[0] or not answers[1]:
            raise DataError(
                f"{where}: 'chosen' and 'rejected' must share a prompt (their first messages) and then differ"
            )
    for side, answer in zip(SIDES, answers):
        if not answer or not isinstance(answer[0], dict) or answer[0].get("role") != "assistant":
            raise DataError(f"{where}: {side!r} answer must start with an assistant message")
    if not prompt:
        raise DataError(f"{where}: 'prompt' is empty")
    return prompt, answers


def pair_prompt(fields: dict, tokenizer, where: str) -> tuple[str, bool, str]:
    """(prompt text, add_special_tokens, the chosen answer's first turn stripped): what a held-out
    greedy decode of a pair's prompt is compared with, as formats.render_prompt gives for SFT rows."""
    if isinstance(fields.get("prompt"), str):
        return fields["prompt"], True, fields["chosen"].strip()
    prompt, (chosen, _) = split_conversation(fields, where)
    return apply_template(tokenizer, prompt, True, where), False, chosen[0]["content"].strip()


def render_pair(fields: dict, tokenizer, where: str) -> tuple[Rendering, Rendering]:
    """(prompt + chosen, prompt + rejected), each supervised on its answer alone."""
    if isinstance(fields.get("prompt"), str):
        prompt = fields["prompt"]
        return tuple(
            Rendering(prompt + fields[side], [(len(prompt), len(prompt + fields[side]))], False, [], True, True)
            for side in SIDES
        )
    if tokenizer.chat_template is None:
        raise DataError(f"{where}: message-list pairs need a chat template and the tokenizer has none")
    prompt, answers = split_conversation(fields, where)
    prompt_text = apply_template(tokenizer, prompt, True, where)
    renderings = []
    for answer in answers:
        try:
            text, spans = render_chat(prompt + answer, tokenizer, where)
        except DataError:
            raise DataError(
                f"{where}: the chat template does not render the prompt as a prefix of prompt + answer, "
                "so the answer cannot be split off"
            ) from None
        spans = [span for span in spans if span[0] >= len(prompt_text)]
        renderings.append(Rendering(text, spans, False, spans, add_special_tokens=False, append_eos=False))
    return renderings[0], renderings[1]
