"""The mesh's tracing extension providers (Istio's MeshConfig extensionProviders[].opentelemetry), set once by `meshctl serve --tracing-provider`."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

# A provider's name is what Telemetry's providers[].name refers to; a DNS-label-like name, as Istio's.
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?$")


@dataclass(frozen=True)
class OpenTelemetryProvider:
    """An OTLP/gRPC collector: Istio's `opentelemetry: {service, port}`."""

    name: str
    service: str
    port: int


def parse_provider(text: str) -> OpenTelemetryProvider:
    """`NAME=SERVICE:PORT` (e.g. `jaeger=jaeger-collector.observability:4317`); ValueError says what is wrong."""
    name, equals, target = text.partition("=")
    if not equals or not _NAME.match(name):
        raise ValueError(f"{text!r}: expected NAME=SERVICE:PORT with a lower-case NAME (e.g. otel=collector:4317)")
    service, colon, port_text = target.rpartition(":")
    if not colon or not service or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{text!r}: expected SERVICE:PORT after '=' with a port from 1 to 65535")
    return OpenTelemetryProvider(name, service.strip("[]"), int(port_text))


# The control plane's providers, in the order given; the first is the default (Istio's
# MeshConfig defaultProviders.tracing) for Telemetry tracing entries that name none.
_configured: dict[str, OpenTelemetryProvider] = {}


def configure(providers: Iterable[OpenTelemetryProvider]) -> None:
    """Set by `meshctl serve` before it validates or compiles anything."""
    chosen: dict[str, OpenTelemetryProvider] = {}
    for provider in providers:
        if provider.name in chosen:
            raise ValueError(f"tracing provider {provider.name!r} is given twice")
        chosen[provider.name] = provider
    _configured.clear()
    _configured.update(chosen)


def tracing_providers() -> Mapping[str, OpenTelemetryProvider]:
    return dict(_configured)


def default_tracing_provider() -> OpenTelemetryProvider | None:
    return next(iter(_configured.values()), None)
