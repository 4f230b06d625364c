"""Telemetry (telemetry.istio.io): access logging, tracing and metrics settings per mesh, namespace or workload."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from pydantic import Field

from meshctl.resources.common import MeshModel
from meshctl.resources.extension_providers import tracing_providers
from meshctl.resources.security_common import (
    TargetRefsUnsupported,
    TargetRefUnsupported,
    WorkloadSelector,
)
from meshctl.resources.support import NotEnforced

# Providers every mesh has without configuration. Istio's `envoy` writes Envoy's default text
# format; meshctl sends it to the sidecar's stderr (the choice: stdout is the app's to share).
# `envoy-json` writes Istio's JSON access log fields there, one object per line.
ACCESS_LOG_PROVIDERS = ("envoy", "envoy-json")
# Tracing providers are the control plane's (`meshctl serve --tracing-provider NAME=SERVICE:PORT`,
# Istio's MeshConfig extensionProviders): see extension_providers. Metrics providers are stored
# for a later issue; this name is accepted now.
METRICS_PROVIDERS = ("prometheus",)

WorkloadMode = Literal["CLIENT", "SERVER", "CLIENT_AND_SERVER"]

# The filter expressions the sidecars run: a comparison of the response code with a number
# (Envoy's status_code_filter). Istio takes any CEL; others are refused rather than ignored.
STATUS_EXPRESSION = re.compile(r"^\s*response\.code\s*(>=|<=|==|>|<)\s*(\d{1,3})\s*$")


class ProviderRef(MeshModel):
    name: str


class WorkloadModeSelector(MeshModel):
    mode: WorkloadMode = "CLIENT_AND_SERVER"


class AccessLogFilter(MeshModel):
    expression: str


class AccessLogging(MeshModel):
    match: WorkloadModeSelector | None = None
    providers: list[ProviderRef] | None = None
    disabled: bool | None = None
    filter: AccessLogFilter | None = None


class LiteralTag(MeshModel):
    value: str


class EnvironmentTag(MeshModel):
    name: str
    default_value: str | None = None


class HeaderTag(MeshModel):
    name: str
    default_value: str | None = None


class CustomTag(MeshModel):
    """One of: a literal value, an environment variable of the sidecar, a request header."""

    literal: LiteralTag | None = None
    environment: EnvironmentTag | None = None
    header: HeaderTag | None = None


class Tracing(MeshModel):
    match: WorkloadModeSelector | None = None
    providers: list[ProviderRef] | None = None
    random_sampling_percentage: Annotated[float, Field(ge=0, le=100, strict=False)] | None = None
    disable_span_reporting: bool | None = None
    custom_tags: dict[str, CustomTag] | None = None
    use_request_id_for_trace_sampling: Annotated[
        bool | None, NotEnforced("meshctl samples by a random draw, not by the x-request-id")
    ] = None


class Metrics(MeshModel):
    providers: list[ProviderRef] | None = None
    overrides: list[dict[str, Any]] | None = None
    reporting_interval: str | None = None


class TelemetrySpec(MeshModel):
    selector: WorkloadSelector | None = None
    target_ref: TargetRefUnsupported = None
    target_refs: TargetRefsUnsupported = None
    access_logging: list[AccessLogging] | None = None
    tracing: list[Tracing] | None = None
    metrics: Annotated[list[Metrics] | None, NotEnforced("stored; metrics overrides are compiled by a later issue")] = None


def status_filter(expression: str) -> tuple[str, int] | None:
    """`response.code >= 400` → ("GE", 400) (Envoy's comparison ops); None when not of that form."""
    found = STATUS_EXPRESSION.match(expression)
    if found is None:
        return None
    op, value = found.group(1), int(found.group(2))
    return {">=": ("GE", value), "<=": ("LE", value), "==": ("EQ", value), ">": ("GE", value + 1), "<": ("LE", value - 1)}[op]


def _unknown(name: str, known: tuple[str, ...]) -> str:
    return f"unknown provider {name!r}; known providers: {', '.join(known)}"


def problems(spec: TelemetrySpec) -> Iterator[tuple[str, str]]:
    for index, logging in enumerate(spec.access_logging or []):
        here = f"spec.accessLogging[{index}]"
        for position, provider in enumerate(logging.providers or []):
            if provider.name not in ACCESS_LOG_PROVIDERS:
                yield f"{here}.providers[{position}].name", _unknown(provider.name, ACCESS_LOG_PROVIDERS)
        if logging.filter is not None and status_filter(logging.filter.expression) is None:
            reason = (
                f"expression {logging.filter.expression!r} is not supported; meshctl compiles "
                "comparisons of the response code, e.g. 'response.code >= 400'"
            )
            yield f"{here}.filter.expression", reason
    configured = tuple(tracing_providers())
    for index, tracing in enumerate(spec.tracing or []):
        here = f"spec.tracing[{index}]"
        for position, provider in enumerate(tracing.providers or []):
            if provider.name not in configured:
                known = configured or ("none: meshctl serve --tracing-provider NAME=SERVICE:PORT configures them",)
                yield f"{here}.providers[{position}].name", _unknown(provider.name, known)
        for tag, custom in (tracing.custom_tags or {}).items():
            kinds = [kind for kind in ("literal", "environment", "header") if getattr(custom, kind) is not None]
            if len(kinds) != 1:
                yield f"{here}.customTags.{tag}", "needs exactly one of literal, environment, header"
    for index, metrics in enumerate(spec.metrics or []):
        for position, provider in enumerate(metrics.providers or []):
            if provider.name not in METRICS_PROVIDERS:
                yield f"spec.metrics[{index}].providers[{position}].name", _unknown(provider.name, METRICS_PROVIDERS)
