"""An Ollama Modelfile for an exported GGUF: FROM, the chat template as Ollama's TEMPLATE, the
stop tokens and the generation config's sampling PARAMETERs.

Ollama's templates are Go templates and the model's chat template is Jinja, so the template is
not translated but measured: the Jinja template is rendered on a few conversations with
sentinel contents, which cuts it into the text before and after each role's content, the
generation prompt, the text that opens every conversation and the default system prompt when
there is none. The Go template puts those pieces back in that order, and a Python rendering of
the same pieces must reproduce the Jinja output on every probe conversation; a template that
does not follow that shape (tools, per-turn logic) gets no TEMPLATE line, and Ollama falls back
to its own reading of the chat template stored in the GGUF.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

SENTINELS = ("\x01system\x01", "\x01first\x01", "\x01answer\x01", "\x01second\x01")
ROLES = ("system", "user", "assistant")


@dataclass
class TemplatePieces:
    opening: str
    """text every conversation starts with (a BOS token, a fixed system header)."""
    default_system: str
    """what the template writes when the conversation has no system message."""
    wraps: dict
    """role -> (before content, after content)."""
    generation_prompt: str


def chat_template_pieces(tokenizer) -> Optional[TemplatePieces]:
    """The pieces of the tokenizer's chat template, or None when it is not a per-role wrapping."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    system, first, answer, second = SENTINELS

    def render(messages, generation_prompt=False) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    try:
        alone = render([{"role": "user", "content": first}])
        asked = render([{"role": "user", "content": first}], generation_prompt=True)
        answered = render([{"role": "user", "content": first}, {"role": "assistant", "content": answer}])
        again = render(
            [
                {"role": "user", "content": first},
                {"role": "assistant", "content": answer},
                {"role": "user", "content": second},
            ]
        )
        with_system = render([{"role": "system", "content": system}, {"role": "user", "content": first}])
    except Exception:  # noqa: BLE001 - a template that rejects these conversations is not a simple one
        return None
    if not (asked.startswith(alone) and answered.startswith(alone) and again.startswith(answered)):
        return None
    user_turn = again[len(answered) :]
    assistant_turn = answered[len(alone) :]
    if second not in user_turn or answer not in assistant_turn:
        return None
    user_wrap = tuple(user_turn.split(second, 1))
    first_user_turn = first.join(user_wrap)
    if not (alone.endswith(first_user_turn) and with_system.endswith(first_user_turn)):
        return None
    head = alone[: -len(first_user_turn)]
    system_turn = with_system[: -len(first_user_turn)]
    opening = common_prefix(head, system_turn)
    if system not in system_turn[len(opening) :]:
        return None
    return TemplatePieces(
        opening=opening,
        default_system=head[len(opening) :],
        wraps={
            "system": tuple(system_turn[len(opening) :].split(system, 1)),
            "user": user_wrap,
            "assistant": tuple(assistant_turn.split(answer, 1)),
        },
        generation_prompt=asked[len(alone) :],
    )


def common_prefix(first: str, second: str) -> str:
    size = 0
    while size < min(len(first), len(second)) and first[size] == second[size]:
        size += 1
    return first[:size]


def render_pieces(pieces: TemplatePieces, messages: list[dict]) -> str:
    """What the Go template of `go_template(pieces)` renders, in Python, to check the pieces."""
    text = pieces.opening
    if not messages or messages[0]["role"] != "system":
        text += pieces.default_system
    for message in messages:
        before, after = pieces.wraps[message["role"]]
        text += before + message["content"] + after
    return text + pieces.generation_prompt


def pieces_reproduce_template(tokenizer, pieces: TemplatePieces) -> bool:
    conversations = (
        [{"role": "user", "content": "Hi there"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "What is 2+2?"},
        ],
    )
    for messages in conversations:
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if render_pieces(pieces, messages) != expected:
            return False
    return True


def go_template(pieces: TemplatePieces) -> str:
    def literal(text: str) -> str:
        # Go template text is verbatim except for actions; a "{{" in the text is written as one.
        return text.replace("{{", '{{ "{{" }}')

    branches = []
    for keyword, role in zip(("if", "else if", "else if"), ROLES):
        before, after = pieces.wraps[role]
        branches.append(f'{{{{ {keyword} eq .Role "{role}" }}}}{literal(before)}{{{{ .Content }}}}{literal(after)}')
    no_system_first = '{{ if or (not .Messages) (ne (index .Messages 0).Role "system") }}'
    default_system = f"{no_system_first}{literal(pieces.default_system)}{{{{ end }}}}" if pieces.default_system else ""
    return (
        literal(pieces.opening)
        + default_system
        + "{{ range .Messages }}"
        + "".join(branches)
        + "{{ end }}{{ end }}"
        + literal(pieces.generation_prompt)
    )


def stop_tokens(tokenizer, generation_config: dict) -> list[str]:
    """The tokens that end a turn: generation_config's eos ids and the tokenizer's eos."""
    eos = generation_config.get("eos_token_id")
    ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(tokenizer.convert_ids_to_tokens(index) for index in ids))


def sampling_parameters(config: dict) -> dict:
    """generation_config.json's sampling in Ollama's names; greedy when it does not sample."""
    if not config.get("do_sample", False) and "temperature" not in config:
        return {"temperature": 0}
    names = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "repetition_penalty": "repeat_penalty"}
    return {ollama: config[key] for key, ollama in names.items() if config.get(key) is not None}


def modelfile(gguf_name: str, model_dir: Path) -> tuple[str, list[str]]:
    """(the Modelfile's text, notes for the user)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    generation_file = model_dir / "generation_config.json"
    generation_config = json.loads(generation_file.read_text()) if generation_file.is_file() else {}
    lines = [f"FROM ./{gguf_name}"]
    notes = []
    pieces = chat_template_pieces(tokenizer)
    if pieces is not None and pieces_reproduce_template(tokenizer, pieces):
        lines.append('TEMPLATE """' + go_template(pieces).replace('"""', '" ""') + '"""')
    elif getattr(tokenizer, "chat_template", None):
        notes.append(
            "the chat template is not a plain per-role wrapping: no TEMPLATE line, Ollama reads the one in the GGUF"
        )
    for token in stop_tokens(tokenizer, generation_config):
        lines.append(f"PARAMETER stop {json.dumps(token)}")
    for name, value in sampling_parameters(generation_config).items():
        lines.append(f"PARAMETER {name} {value}")
    return "\n".join(lines) + "\n", notes
