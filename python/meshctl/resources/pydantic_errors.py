"""pydantic's errors in this mesh's words: the field path as Istio names it, and a reason a person reads."""

from __future__ import annotations

import difflib
import typing
from types import UnionType
from typing import Any

from pydantic import BaseModel, ValidationError

from meshctl.resources.errors import Issue, field_path


def issues_from(
    error: ValidationError, where: str, prefix: tuple[str, ...], model: type[BaseModel]
) -> list[Issue]:
    issues = []
    for detail in error.errors(include_url=False):
        location = tuple(detail["loc"])
        issues.append(Issue(where, field_path(prefix + location), _reason(detail, model, location)))
    return issues


def _reason(detail: dict[str, Any], model: type[BaseModel], location: tuple[Any, ...]) -> str:
    kind, message = detail["type"], detail["msg"]
    if kind == "extra_forbidden":
        known = _known_fields(model, location[:-1])
        hint = ""
        close = difflib.get_close_matches(str(location[-1]), known, n=1)
        if close:
            hint = f"; did you mean {close[0]!r}?"
        elif known:
            hint = f"; known fields here: {', '.join(known)}"
        return f"unknown field{hint}"
    if kind == "missing":
        return "required field is missing"
    if kind in ("value_error", "assertion_error"):
        return message.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    # Type errors: say what was found, since YAML quietly turns `80` and "80" into different types.
    shown = repr(detail.get("input"))
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{message[:1].lower()}{message[1:]} (got {shown})"


def _known_fields(model: type[BaseModel], location: tuple[Any, ...]) -> list[str]:
    current: Any = model
    for part in location:
        current = _descend(current, part)
        if current is None:
            return []
    current = _unwrap(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return [info.alias or name for name, info in current.model_fields.items()]
    return []


def _unwrap(annotation: Any) -> Any:
    """Strip Annotated and `X | None` down to the one type that carries fields."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, UnionType):
            members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
            if len(members) != 1:
                return annotation
            annotation = members[0]
        else:
            return annotation


def _descend(annotation: Any, part: Any) -> Any:
    annotation = _unwrap(annotation)
    origin = typing.get_origin(annotation)
    if origin is list and isinstance(part, int):
        return typing.get_args(annotation)[0]
    if origin is dict:
        return typing.get_args(annotation)[1]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        for name, info in annotation.model_fields.items():
            if part in (name, info.alias):
                return info.annotation
    return None
