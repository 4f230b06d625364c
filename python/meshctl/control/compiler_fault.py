"""A VirtualService route's fault injection and mirroring in Envoy's terms, as istiod writes them:
the HTTP fault filter on the connection manager, each route's HTTPFault in its
typed_per_filter_config, and its mirrors as the route action's request_mirror_policies."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from meshctl.resources.common import duration_seconds
from meshctl.resources.virtual_service import GRPC_STATUS_CODES, Destination, FaultInjection, HttpRoute, Percent

Json = dict[str, Any]

FAULT_FILTER = "envoy.filters.http.fault"
FAULT_TYPE = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"


def fault_filter() -> Json:
    """The connection manager's fault filter, before the router. Empty: it does nothing on a
    route without its own HTTPFault, so istiod puts it on every sidecar outbound listener."""
    return {"name": FAULT_FILTER, "typed_config": {"@type": FAULT_TYPE}}


def _fraction(percent: Percent) -> Json:
    # istiod's precision: a share of a million keeps four decimals of a percentage.
    return {"numerator": round(percent.value * 10_000), "denominator": "MILLION"}


def _whole(percent: int) -> Json:
    return {"numerator": percent, "denominator": "HUNDRED"}


def http_fault(fault: FaultInjection) -> Json:
    """The route's HTTPFault. A delay or abort without a share applies to no request, as in
    istiod (Envoy reads a missing percentage as 0)."""
    config: Json = {"@type": FAULT_TYPE}
    if fault.delay is not None and fault.delay.fixed_delay is not None:
        delay: Json = {"fixed_delay": f"{duration_seconds(fault.delay.fixed_delay):.3f}s"}
        if fault.delay.percentage is not None:
            delay["percentage"] = _fraction(fault.delay.percentage)
        else:
            delay["percentage"] = _whole(fault.delay.percent or 0)
        config["delay"] = delay
    if fault.abort is not None:
        abort: Json = {}
        if fault.abort.http_status is not None:
            abort["http_status"] = fault.abort.http_status
        elif fault.abort.grpc_status is not None:
            abort["grpc_status"] = GRPC_STATUS_CODES[fault.abort.grpc_status]
        if fault.abort.percentage is not None:
            abort["percentage"] = _fraction(fault.abort.percentage)
        config["abort"] = abort
    return config


def add_fault(route: Json, http: HttpRoute) -> None:
    if http.fault is not None:
        route.setdefault("typed_per_filter_config", {})[FAULT_FILTER] = http_fault(http.fault)


def mirror_policies(http: HttpRoute, cluster_for: Callable[[Destination], str]) -> list[Json]:
    """The route action's request_mirror_policies: `mirror` at mirrorPercentage (100 % when
    unset; none at 0 %), or each of `mirrors` at its own percentage (100 % when unset)."""
    wanted: list[tuple[Destination, Json]] = []
    if http.mirror is not None:
        if http.mirror_percentage is not None:
            share = _fraction(http.mirror_percentage) if http.mirror_percentage.value > 0 else None
        elif http.mirror_percent is not None:
            share = _whole(http.mirror_percent) if http.mirror_percent > 0 else None
        else:
            share = _whole(100)
        if share is not None:
            wanted.append((http.mirror, share))
    for mirror in http.mirrors or []:
        share = _fraction(mirror.percentage) if mirror.percentage is not None else _whole(100)
        if share["numerator"] > 0:
            wanted.append((mirror.destination, share))
    return [
        {"cluster": cluster_for(destination), "runtime_fraction": {"default_value": share}}
        for destination, share in wanted
    ]
