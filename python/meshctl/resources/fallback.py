"""Fallback (policy.meshctl.io/v1alpha1): a destination-level breaker and the degraded answer a
caller gets instead of a failure (降级), meshctl's own kind beside Istio's untouched ones."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Literal

from pydantic import Field

from meshctl.resources.common import Duration, MeshModel, Port, duration_seconds

# When a fallback answers, as `spec.on` names them (and as x-meshctl-fallback says which).
REASONS = ("breaker-open", "no-healthy-upstream", "timeout", "5xx", "overflow")
Reason = Literal["breaker-open", "no-healthy-upstream", "timeout", "5xx", "overflow"]
Ratio = Annotated[float, Field(gt=0, le=1)]
# Fallback bodies are answered from memory by every sidecar: kept small.
BODY_LIMIT = 64 * 1024


class Breaker(MeshModel):
    """Opens when, over `window`, at least `minRequests` calls were made and the share of failed
    (5xx, reset, timeout, overflow) or slow ones reaches its ratio; stays open `openFor`, then
    lets one probe through (half-open): its success closes it, its failure opens it again."""

    error_ratio: Ratio | None = None
    slow_call_ratio: Ratio | None = None
    slow_call_duration: Duration | None = None
    min_requests: Annotated[int, Field(ge=1, le=1_000_000)] = 10
    window: Duration = "10s"
    open_for: Duration = "5s"


class FallbackDestination(MeshModel):
    host: str = Field(min_length=1)
    subset: str | None = None
    port: Port | None = None


class FallbackResponse(MeshModel):
    status: Annotated[int, Field(ge=200, le=599)] = 200
    headers: dict[str, str] = Field(default_factory=dict)
    body: Annotated[str, Field(max_length=BODY_LIMIT)] = ""


class FallbackTarget(MeshModel):
    destination: FallbackDestination | None = None
    response: FallbackResponse | None = None


class FallbackSpec(MeshModel):
    host: str = Field(min_length=1)
    breaker: Breaker | None = None
    # Default: every reason there is a way to see (breaker-open only with a breaker).
    on: list[Reason] | None = None
    to: FallbackTarget


def reasons(spec: FallbackSpec) -> list[str]:
    """What the fallback applies on: `spec.on`, else every reason the spec can produce."""
    if spec.on is not None:
        return list(dict.fromkeys(spec.on))
    return [r for r in REASONS if r != "breaker-open" or spec.breaker is not None]


def problems(spec: FallbackSpec) -> Iterator[tuple[str, str]]:
    """Rules the schema cannot say alone; (field path, reason)."""
    target = spec.to
    if (target.destination is None) == (target.response is None):
        yield "spec.to", "set exactly one of destination (a degraded service) or response (a fixed answer)"
    if spec.on is not None and not spec.on:
        yield "spec.on", "names no reason: the fallback would never apply (omit it for every reason)"
    if spec.on and "breaker-open" in spec.on and spec.breaker is None:
        yield "spec.on", "names breaker-open but spec.breaker is not set"
    if spec.on and "breaker-open" not in spec.on and spec.breaker is not None:
        yield "spec.on", "omits breaker-open, so requests the breaker stops would get no answer; add it"
    for name, value in (target.response.headers.items() if target.response else ()):
        if not name or not all(c.isalnum() or c in "-_" for c in name) or name.lower() != name:
            yield f"spec.to.response.headers.{name}", "not a header name (lowercase letters, digits, '-')"
        elif any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            yield f"spec.to.response.headers.{name}", "control characters are not allowed in a header value"
    breaker = spec.breaker
    if breaker is None:
        return
    if breaker.error_ratio is None and breaker.slow_call_ratio is None:
        yield "spec.breaker", "sets neither errorRatio nor slowCallRatio: it could never open"
    if (breaker.slow_call_ratio is None) != (breaker.slow_call_duration is None):
        yield "spec.breaker.slowCallDuration", "slowCallRatio and slowCallDuration go together"
    for name, value in (("window", breaker.window), ("openFor", breaker.open_for),
                        ("slowCallDuration", breaker.slow_call_duration)):  # fmt: skip
        if value is not None and duration_seconds(value) == 0:
            yield f"spec.breaker.{name}", f"{value} is zero; it must be at least 1ms"
    if duration_seconds(breaker.window) > 3600:
        yield "spec.breaker.window", f"{breaker.window} is longer than 1h"
