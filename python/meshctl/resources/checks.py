"""Rules one schema cannot say alone: weights that sum to 100, route or redirect, unique names,
retry and outlier settings that contradict each other."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

from meshctl.resources.common import duration_seconds
from meshctl.resources.destination_rule import DestinationRuleSpec
from meshctl.resources.errors import field_path
from meshctl.resources.service_entry import ServiceEntrySpec
from meshctl.resources.traffic_policy import TrafficPolicy
from meshctl.resources.virtual_service import HttpRoute, VirtualServiceSpec

# (field path, reason); the caller adds which resource.
Problem = tuple[str, str]


def virtual_service(spec: VirtualServiceSpec) -> Iterator[Problem]:
    for index, gateway in enumerate(spec.gateways or []):
        if gateway != "mesh":
            yield (
                f"spec.gateways[{index}]",
                f"gateway {gateway!r} is not supported yet; only 'mesh' (the sidecars) exists here",
            )
    for index, route in enumerate(spec.http):
        yield from _http_route(route, ("spec", "http", index))


def _http_route(route: HttpRoute, at: tuple[str | int, ...]) -> Iterator[Problem]:
    here = field_path(at)
    if route.route is None and route.redirect is None:
        yield here, "needs a route (destinations) or a redirect"
    if route.route is not None and route.redirect is not None:
        yield here, "route and redirect cannot both be set"
    if route.redirect is not None and route.rewrite is not None:
        yield here, "rewrite and redirect cannot both be set"
    if route.route is not None and len(route.route) == 0:
        yield f"{here}.route", "needs at least one destination"
    for match_index, match in enumerate(route.match or []):
        for name in match.headers or {}:
            if name != name.lower():
                yield (
                    f"{here}.match[{match_index}].headers.{name}",
                    f"header names are matched lowercase; write {name.lower()!r}",
                )
    if route.retries is not None and route.retries.per_try_timeout and route.timeout:
        per_try, overall = duration_seconds(route.retries.per_try_timeout), duration_seconds(route.timeout)
        if (route.retries.attempts or 0) > 0 and overall > 0 and per_try > overall:
            yield (
                f"{here}.retries.perTryTimeout",
                f"{route.retries.per_try_timeout} is longer than the route's timeout "
                f"{route.timeout}, which bounds every try together: no retry would ever start",
            )
    yield from _fault_and_mirror(route, here)
    destinations = route.route or []
    # One destination without a weight gets all traffic; anything else states every share.
    if len(destinations) > 1 or any(d.weight is not None for d in destinations):
        total = sum(d.weight or 0 for d in destinations)
        if total != 100:
            shares = ", ".join(
                f"{d.destination.host}{'/' + d.destination.subset if d.destination.subset else ''}"
                f"={d.weight or 0}"
                for d in destinations
            )
            yield f"{here}.route", f"weights sum to {total}, they must sum to 100 ({shares})"


def _fault_and_mirror(route: HttpRoute, here: str) -> Iterator[Problem]:
    if route.redirect is not None:
        # Faults and mirrors act on forwarded requests; a redirect forwards nothing.
        for name, value in (("fault", route.fault), ("mirror", route.mirror), ("mirrors", route.mirrors)):
            if value is not None:
                yield f"{here}.{name}", f"{name} and redirect cannot both be set"
    if route.mirror is not None and route.mirrors is not None:
        yield f"{here}.mirrors", "mirror and mirrors cannot both be set (as istiod refuses them)"
    if route.mirror_percent is not None and route.mirror_percentage is not None:
        yield f"{here}.mirrorPercentage", "set mirrorPercentage or the deprecated mirrorPercent, not both"
    if route.mirror is None and (route.mirror_percent is not None or route.mirror_percentage is not None):
        name = "mirrorPercentage" if route.mirror_percentage is not None else "mirrorPercent"
        reason = "applies to mirror only" + ("; give each of mirrors its own percentage" if route.mirrors else "")
        yield f"{here}.{name}", f"{reason} (it would be ignored)"
    if route.fault is not None and route.fault.delay is not None and route.fault.delay.fixed_delay is not None:
        if duration_seconds(route.fault.delay.fixed_delay) < 0.001:
            yield f"{here}.fault.delay.fixedDelay", "must be at least 1ms (as Istio requires)"


def destination_rule(spec: DestinationRuleSpec) -> Iterator[Problem]:
    seen: set[str] = set()
    for index, subset in enumerate(spec.subsets or []):
        if subset.name in seen:
            yield f"spec.subsets[{index}].name", f"subset {subset.name!r} is defined twice"
        seen.add(subset.name)
        if subset.traffic_policy is not None:
            yield from _traffic_policy(subset.traffic_policy, f"spec.subsets[{index}].trafficPolicy")
    if spec.traffic_policy is not None:
        yield from _traffic_policy(spec.traffic_policy, "spec.trafficPolicy")


def _traffic_policy(policy: TrafficPolicy, here: str) -> Iterator[Problem]:
    ports: set[int] = set()
    for index, port_policy in enumerate(policy.port_level_settings or []):
        if port_policy.port.number in ports:
            yield (f"{here}.portLevelSettings[{index}].port.number",
                   f"port {port_policy.port.number} has settings twice")  # fmt: skip
        ports.add(port_policy.port.number)
    outliers = [(here, policy.outlier_detection)] + [
        (f"{here}.portLevelSettings[{i}]", p.outlier_detection)
        for i, p in enumerate(policy.port_level_settings or [])
    ]
    for at, outlier in outliers:
        if outlier is None:
            continue
        for name, value in (("interval", outlier.interval), ("baseEjectionTime", outlier.base_ejection_time)):
            if value is not None and duration_seconds(value) == 0:
                yield f"{at}.outlierDetection.{name}", f"{value} is zero; it must be at least 1ms"
        if outlier.consecutive_local_origin_failures and not outlier.split_external_local_origin_errors:
            yield (f"{at}.outlierDetection.consecutiveLocalOriginFailures",
                   "counts only with splitExternalLocalOriginErrors: true (Istio ignores it otherwise)")  # fmt: skip


def service_entry(spec: ServiceEntrySpec) -> Iterator[Problem]:
    numbers: set[int] = set()
    names: set[str] = set()
    for index, port in enumerate(spec.ports or []):
        if port.number in numbers:
            yield f"spec.ports[{index}].number", f"port {port.number} is listed twice"
        numbers.add(port.number)
        if port.name is not None:
            if port.name in names:
                yield f"spec.ports[{index}].name", f"port name {port.name!r} is used twice"
            names.add(port.name)
    for index, endpoint in enumerate(spec.endpoints or []):
        if spec.resolution == "STATIC" and not _is_ip(endpoint.address):
            yield (
                f"spec.endpoints[{index}].address",
                f"{endpoint.address!r} is not an IP address, which resolution STATIC needs",
            )
        for port_name in endpoint.ports or {}:
            if port_name not in names:
                yield (
                    f"spec.endpoints[{index}].ports.{port_name}",
                    f"no port named {port_name!r} in spec.ports",
                )
    if spec.resolution == "STATIC" and not spec.endpoints and spec.workload_selector is None:
        yield "spec.resolution", "STATIC needs endpoints or a workloadSelector"


def _is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True
