"""Row formats: detect a file's format, validate each row, render a row to text + supervised spans.

Three formats exist: chat (`messages`), alpaca (`instruction`, optional `input`, `output`) and
text (`text`). Rendering turns a row into one string plus the character spans the model learns
from; tokenize.py maps those character spans onto tokens through the tokenizer's offsets, so
supervision never depends on how a tokenizer happens to split the text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qlora.errors import DataError

FORMATS = ("alpaca", "chat", "text")
ROLES = ("system", "user", "assistant", "tool")

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

Span = tuple[int, int]


@dataclass(frozen=True)
class Rendering:
    """One row as the exact text the model sees, and which characters it learns to produce."""

    text: str
    supervised_spans: list[Span]
    """Character spans [start, end) whose tokens are supervised (ignored when supervise_all)."""
    supervise_all: bool
    answer_spans: list[Span]
    """Each assistant answer rendered by a chat template: its tokens must include the EOS token."""
    add_special_tokens: bool
    """False for chat templates, which write their own BOS."""
    append_eos: bool
    """Plain renderings end with a supervised EOS token so the model learns to stop."""


# --------------------------------------------------------------------------- detection, validation


def detect_format(fields: Any, where: str) -> str:
    """The format of a file, from the keys of its first row."""
    require_object(fields, where)
    if "chosen" in fields and "rejected" in fields:
        return "preference"
    if "messages" in fields:
        return "chat"
    if "instruction" in fields and "output" in fields:
        return "alpaca"
    if "text" in fields:
        return "text"
    found = ", ".join(sorted(map(str, fields))) or "none"
    raise DataError(
        f"{where}: cannot detect the data format from the keys ({found}); expected 'messages' (chat), "
        "'instruction' + 'output' (alpaca), 'text' (text) or 'chosen' + 'rejected' (preference), "
        "or set data.format"
    )


def validate_fields(fields: Any, format: str, where: str) -> None:
    """Raise DataError naming `where` if the row cannot be rendered as `format`."""
    require_object(fields, where)
    if format == "chat":
        validate_messages(fields, where)
    elif format == "alpaca":
        require_text(fields, "instruction", where)
        if fields.get("input") is not None and not isinstance(fields["input"], str):
            raise DataError(f"{where}: 'input' must be a string, got {type_name(fields['input'])}")
        require_text(fields, "output", where)
    elif format == "text":
        require_text(fields, "text", where)
    else:
        raise ValueError(f"unknown row format {format!r}; expected one of {', '.join(FORMATS)}")


def validate_messages(fields: dict, where: str) -> None:
    if "messages" not in fields:
        raise DataError(f"{where}: missing field 'messages' (chat rows are {{\"messages\": [{{role, content}}, ...]}})")
    messages = fields["messages"]
    if not isinstance(messages, list):
        raise DataError(f"{where}: 'messages' must be a list, got {type_name(messages)}")
    if not messages:
        raise DataError(f"{where}: 'messages' is empty")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise DataError(f"{where}: messages[{index}] must be an object with 'role' and 'content'")
        role = message["role"]
        if role not in ROLES:
            raise DataError(f"{where}: messages[{index}].role {role!r} is not one of {', '.join(ROLES)}")
        content = message.get("content")
        if not isinstance(content, str):
            raise DataError(f"{where}: messages[{index}].content must be a string, got {type_name(content)}")
        if role == "assistant" and not content.strip():
            raise DataError(f"{where}: messages[{index}] is an empty assistant answer")
    if not any(message["role"] == "assistant" for message in messages):
        raise DataError(f"{where}: no assistant turn, so there is nothing to learn from this conversation")


def require_object(fields: Any, where: str) -> None:
    if not isinstance(fields, dict):
        raise DataError(f"{where}: a row must be an object with named fields, got {type_name(fields)}")


def require_text(fields: dict, key: str, where: str) -> None:
    if key not in fields:
        raise DataError(f"{where}: missing field {key!r}")
    value = fields[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type_name(value)}")
    if not value.strip():
        raise DataError(f"{where}: {key!r} is empty")


def type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


# --------------------------------------------------------------------------- rendering


def render_row(fields: dict, format: str, tokenizer, train_on: str, where: str) -> Rendering:
    """The text of a validated row and its supervised character spans."""
    supervise_all = train_on == "all"
    if format == "text":
        text = fields["text"]
        return Rendering(text, [], True, [], add_special_tokens=True, append_eos=True)
    messages = alpaca_messages(fields) if format == "alpaca" else fields["messages"]
    if format == "alpaca" and tokenizer.chat_template is None:
        prompt = alpaca_prompt(fields)
        text = prompt + fields["output"]
        return Rendering(text, [(len(prompt), len(text))], supervise_all, [], add_special_tokens=True, append_eos=True)
    text, answer_spans = render_chat(messages, tokenizer, where)
    return Rendering(text, answer_spans, supervise_all, answer_spans, add_special_tokens=False, append_eos=False)


def render_chat(messages: list[dict], tokenizer, where: str) -> tuple[str, list[Span]]:
    """The rendered conversation and the character span of each assistant turn.

    A turn's span runs from the end of the prompt that asks for it (the conversation before it,
    with the generation prompt) to the end of the conversation rendered through it, so it holds
    exactly what the model must produce, terminator included, whatever the template looks like.
    That only works if the template renders prefixes as prefixes, which is checked.
    """
    full = apply_template(tokenizer, messages, False, where)
    answer_spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = apply_template(tokenizer, messages[:index], True, where)
        through_answer = apply_template(tokenizer, messages[: index + 1], False, where)
        if not (full.startswith(prompt) and full.startswith(through_answer) and len(prompt) < len(through_answer)):
            raise DataError(
                f"{where}: the chat template does not render this conversation prefix by prefix, "
                "so assistant turns cannot be located"
            )
        answer_spans.append((len(prompt), len(through_answer)))
    return full, answer_spans


def apply_template(tokenizer, messages: list[dict], add_generation_prompt: bool, where: str) -> str:
    try:
        # tokenize=False: in transformers 5, tokenize=True returns a BatchEncoding, and we need the
        # text itself to find character spans.
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as error:  # a template is user code: any failure is a problem with this row
        raise DataError(f"{where}: the chat template cannot render this conversation ({error})") from None


def alpaca_messages(fields: dict) -> list[dict]:
    request = fields["instruction"]
    if fields.get("input"):
        request += "\n\n" + fields["input"]
    return [{"role": "user", "content": request}, {"role": "assistant", "content": fields["output"]}]


def alpaca_prompt(fields: dict) -> str:
    if fields.get("input"):
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=fields["instruction"], input=fields["input"])
    return ALPACA_PROMPT.format(instruction=fields["instruction"])


def render_prompt(fields: dict, format: str, tokenizer, where: str) -> tuple[str, bool, str]:
    """(prompt text ending where the last answer starts, add_special_tokens, that answer stripped)."""
    if format == "text":
        raise DataError(f"{where}: text rows have no prompt and answer")
    if format == "alpaca" and tokenizer.chat_template is None:
        return alpaca_prompt(fields), True, fields["output"].strip()
    messages = alpaca_messages(fields) if format == "alpaca" else fields["messages"]
    last_answer = max(index for index, message in enumerate(messages) if message["role"] == "assistant")
    prompt = apply_template(tokenizer, messages[:last_answer], True, where)
    return prompt, False, messages[last_answer]["content"].strip()
