"""Building blocks shared by every resource: the model base, metadata, string matches, durations."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel


class MeshModel(BaseModel):
    """Istio's YAML is camelCase; unknown fields are errors, and "80" is not an integer (strict)."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        frozen=True,
        alias_generator=to_camel,
        # Istio's protobuf JSON accepts the proto's snake_case names too.
        populate_by_name=True,
    )


# Kubernetes object names: what `kubectl` would accept, so the same files work in both places.
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _object_name(value: str) -> str:
    if len(value) > 253 or not _DNS_SUBDOMAIN.match(value):
        raise ValueError(
            f"{value!r} is not a valid name: lowercase letters, digits, '-' and '.', "
            "starting and ending with a letter or digit, at most 253 characters"
        )
    return value


def _label_name(value: str) -> str:
    if len(value) > 63 or not _DNS_LABEL.match(value):
        raise ValueError(
            f"{value!r} is not a valid DNS label: lowercase letters, digits and '-', "
            "at most 63 characters"
        )
    return value


ObjectName = Annotated[str, AfterValidator(_object_name)]
LabelName = Annotated[str, AfterValidator(_label_name)]


def _resource_version(value: Any) -> Any:
    # Kubernetes writes versions as strings; a hand-written integer means the same thing.
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        # ValueError, not TypeError: pydantic turns only ValueError into a field-path error.
        message = "must be a version number, as `meshctl get -o yaml` shows it"
        raise ValueError(message)  # noqa: TRY004
    text = str(value)
    if not text.isdigit():
        raise ValueError(f"{value!r} is not a version number")
    return int(text)


class Metadata(MeshModel):
    """The object metadata this mesh keeps. Server-side Kubernetes fields are not accepted."""

    name: ObjectName
    namespace: LabelName = "default"
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None
    # Optimistic concurrency: when given, the apply is refused unless it is still current.
    resource_version: Annotated[Any, AfterValidator(_resource_version)] = None


# Go-style durations as Istio writes them: "10s", "0.5s", "1m30s", "250ms".
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def duration_seconds(text: str) -> float:
    """Seconds in a duration string; the xDS compiler uses this too."""
    position, total = 0, 0.0
    while position < len(text):
        part = _DURATION_PART.match(text, position)
        if not part:
            raise ValueError(f"{text!r} is not a duration; write it like 10s, 0.5s, 250ms or 1m30s")
        total += float(part.group(1)) * _UNIT_SECONDS[part.group(2)]
        position = part.end()
    if not text:
        raise ValueError("an empty string is not a duration")
    return total


def _duration(text: str) -> str:
    seconds = duration_seconds(text)
    # Envoy's timeouts have millisecond resolution; anything shorter is almost certainly a typo.
    if 0 < seconds < 0.001:
        raise ValueError(f"{text!r} is shorter than 1ms")
    return text


Duration = Annotated[str, AfterValidator(_duration)]


# RE2 (Envoy) and Rust's regex crate (our engine) both refuse these Python-only constructs.
_NON_RE2 = re.compile(r"\(\?<?[=!]|\\[1-9]|\(\?P=")


def _regex(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as error:
        raise ValueError(f"invalid regular expression {pattern!r}: {error}") from None
    if _NON_RE2.search(pattern):
        raise ValueError(
            f"regular expression {pattern!r} uses lookaround or a backreference, "
            "which RE2 syntax (the sidecars') does not have"
        )
    return pattern


Regex = Annotated[str, AfterValidator(_regex)]


class StringMatch(MeshModel):
    """Exactly one of exact, prefix or regex (Istio's StringMatch oneof)."""

    exact: str | None = None
    prefix: str | None = None
    regex: Regex | None = None

    @model_validator(mode="after")
    def _one_of(self) -> StringMatch:
        chosen = [name for name in ("exact", "prefix", "regex") if getattr(self, name) is not None]
        if len(chosen) != 1:
            found = f"got {' and '.join(chosen)}" if chosen else "got none"
            raise ValueError(f"set exactly one of exact, prefix or regex ({found})")
        return self


class HeaderOperations(MeshModel):
    """Header edits applied in the order remove, set, add (as Envoy applies them)."""

    set: dict[str, str] | None = None
    add: dict[str, str] | None = None
    remove: list[str] | None = None


class Headers(MeshModel):
    request: HeaderOperations | None = None
    response: HeaderOperations | None = None


class WorkloadSelector(MeshModel):
    labels: dict[str, str] = Field(default_factory=dict)


Port = Annotated[int, Field(ge=1, le=65535)]
