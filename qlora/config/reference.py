"""The README's table of every config key, generated from the schema (`python -m qlora.config`)."""

from __future__ import annotations

import yaml
from pydantic import BaseModel

from qlora.config.schema import JobConfig


def reference_markdown() -> str:
    """Every key with its default and docstring, as the README's table (`python -m qlora.config`)."""
    lines = ["| key | default | meaning |", "|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, f"{prefix}{name}.")
                continue
            default = (
                "required"
                if field.is_required()
                else f"`{yaml.safe_dump(field.default, default_flow_style=True).strip().removesuffix('...').strip()}`"
            )
            # Long docstrings wrap over several source lines; a table cell needs them on one.
            description = " ".join(field.description.split())
            lines.append(f"| `{prefix}{name}` | {default} | {description} |")

    walk(JobConfig, "")
    return "\n".join(lines)
