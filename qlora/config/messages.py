"""A job config's validation error as what users see: ONE line naming the key.

pydantic reports every problem with its location in the schema; this picks the one to show,
phrases it as `key: what is wrong`, and for a misspelt key suggests the nearest valid one at the
same place. The schema is passed in (qlora.config's JobConfig), so nothing here knows its keys.
"""

from __future__ import annotations

import difflib
import typing
from typing import Optional

from pydantic import BaseModel, ValidationError


def first_problem(error: ValidationError, schema: type[BaseModel]) -> tuple[str, str]:
    """(dotted key, one-line message) of the problem to report, noting how many others there are."""
    # A union (e.g. data.train: path or list) reports one error per member; the deepest one is
    # the member the user was writing.
    problems = sorted(error.errors(), key=lambda problem: -len(problem["loc"]))
    more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
    return problem_key(problems[0]), describe_problem(problems[0], schema) + more


def problem_key(problem: dict) -> str:
    return ".".join(problem_location(problem)) or "config"


def problem_location(problem: dict) -> list[str]:
    return [str(part) for part in problem["loc"] if isinstance(part, str) and part.isidentifier()]


def describe_problem(problem: dict, schema: type[BaseModel]) -> str:
    """One pydantic error as `key: what is wrong`, suggesting the closest valid key for typos."""
    location = problem_location(problem)
    key = problem_key(problem)
    kind = problem["type"]
    if kind == "extra_forbidden":
        hint = closest_key(location, schema)
        return f"{key}: unknown key" + (f" (did you mean '{hint}'?)" if hint else "")
    if kind == "missing":
        return f"{key}: required key is missing"
    message = problem["msg"].removeprefix("Value error, ")
    if kind == "value_error":
        return message
    return f"{key}: {message} (got {problem.get('input')!r})"


def closest_key(location: list[str], schema: type[BaseModel]) -> Optional[str]:
    """The valid key nearest to a misspelt one at the same place in the schema."""
    model = schema
    for part in location[:-1]:
        field = model.model_fields.get(part)
        inner = nested_model(field.annotation) if field is not None else None
        if inner is None:
            return None
        model = inner
    matches = difflib.get_close_matches(location[-1], list(model.model_fields), n=1, cutoff=0.5)
    return ".".join(location[:-1] + matches[:1]) if matches else None


def nested_model(annotation) -> Optional[type[BaseModel]]:
    """The section model a field holds: the annotation itself, or the model inside a union or
    list of it (data.train: a path or a list of DataSource)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in typing.get_args(annotation):
        found = nested_model(argument)
        if found is not None:
            return found
    return None
