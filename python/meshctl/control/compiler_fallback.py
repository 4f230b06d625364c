"""Fallback resources compiled onto the guarded host's clusters, as cluster metadata under
`meshctl.fallback` (meshctl's engine enforces it; Envoy keeps unknown metadata and ignores it,
so the same clusters still run on a real Envoy, without the fallback)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from meshctl.resources.common import duration_seconds
from meshctl.resources.fallback import FallbackSpec, reasons
from meshctl.resources.hosts import canonical_host

METADATA_KEY = "meshctl.fallback"
Json = dict[str, Any]


def guarded_hosts(fallbacks: Iterable[Any]) -> dict[str, Any]:
    """Host → the oldest Fallback for it (oldest first in `fallbacks`; as DestinationRules)."""
    chosen: dict[str, Any] = {}
    for stored in fallbacks:
        chosen.setdefault(canonical_host(stored.spec.host, stored.namespace), stored)
    return chosen


def destination(stored: Any, port: int) -> tuple[str, int, str | None] | None:
    """(host, port, subset) a Fallback sends to from a cluster on `port`; None for a response.
    Without a port, the guarded cluster's own port (a degraded version of the same service)."""
    target = stored.spec.to.destination
    if target is None:
        return None
    return canonical_host(target.host, stored.namespace), target.port or port, target.subset


def is_target(stored: Any, name: str, cluster_name: Callable[[str, int, str | None, str], str]) -> bool:
    """Whether cluster `name` is the degraded destination itself (say reviews v1 for reviews):
    it gets no fallback, so a fallback never falls back again."""
    _, port, _, _ = name.split("|", 3)
    target = destination(stored, int(port))
    return target is not None and cluster_name("outbound", target[1], target[2], target[0]) == name


def metadata(stored: Any, port: int, cluster_name: Callable[[str, int, str | None, str], str]) -> Json:
    """The cluster metadata for one cluster of the guarded host on `port`."""
    spec: FallbackSpec = stored.spec
    document: Json = {
        "fallback": f"{stored.namespace}/{stored.name}",
        "host": canonical_host(spec.host, stored.namespace),
        "on": reasons(spec),
    }
    if spec.breaker is not None:
        breaker = spec.breaker
        document["breaker"] = {
            key: value
            for key, value in (
                ("error_ratio", breaker.error_ratio),
                ("slow_call_ratio", breaker.slow_call_ratio),
                ("slow_call_duration_ms", _millis(breaker.slow_call_duration)),
                ("min_requests", breaker.min_requests),
                ("window_ms", _millis(breaker.window)),
                ("open_for_ms", _millis(breaker.open_for)),
            )
            if value is not None
        }
    target = destination(stored, port)
    if target is not None:
        host, to_port, subset = target
        document["cluster"] = cluster_name("outbound", to_port, subset, host)
    else:
        response = spec.to.response
        assert response is not None  # exactly one target, checked at apply
        document["response"] = {"status": response.status, "headers": dict(response.headers), "body": response.body}
    return {"filter_metadata": {METADATA_KEY: document}}


def _millis(duration: str | None) -> int | None:
    return None if duration is None else max(1, round(duration_seconds(duration) * 1000))
