"""RateLimit concurrency rules compiled to the inbound side: the local app's cluster (or, for a rule
with a match, a copy of it behind a route of its own) gets circuit breaker thresholds that hold at
most `maxConcurrent` requests in the app and `queue` more waiting; Envoy and meshctl refuse the rest
with a 503 (flag UO), as any circuit breaker. `queueTimeout` travels as cluster metadata
`meshctl.concurrency` (meshctl's engine bounds the wait; Envoy keeps the metadata and ignores it).

An adaptive rule (`adaptive: true`) is Envoy's adaptive concurrency filter on the inbound connection
manager instead: a limit that follows the app's latency, over which requests are refused (503)."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from meshctl.control.compiler_matchers import string_match
from meshctl.resources.common import StringMatch, duration_seconds
from meshctl.resources.rate_limit import Concurrency, RuleMatch

Json = dict[str, Any]

METADATA_KEY = "meshctl.concurrency"
ADAPTIVE_FILTER = "envoy.filters.http.adaptive_concurrency"
ADAPTIVE_TYPE = "type.googleapis.com/envoy.extensions.filters.http.adaptive_concurrency.v3.AdaptiveConcurrency"
# Envoy requires concurrency_update_interval. Its examples' 0.1 s outruns an app slower than that: a
# window's latencies are then those of requests admitted under earlier limits, and the limit
# overshoots (seen in tests/test_adaptive_concurrency.py). Half a second suits apps up to ~100 ms.
DEFAULT_UPDATE_INTERVAL = "0.5s"


@dataclass(frozen=True)
class ConcurrencyRule:
    """One concurrency rule of one RateLimit; `name` tells its cluster apart (RateLimit and index)."""

    name: str
    match: RuleMatch | None
    concurrency: Concurrency


def rules_for_workload(rate_limits: Iterable[Any], namespace: str, labels: Mapping[str, str]) -> list[ConcurrencyRule]:
    """The concurrency rules of every RateLimit whose selector picks this workload, oldest first."""
    found = []
    for stored in rate_limits:
        selector = stored.spec.selector
        if selector is None or stored.namespace != namespace:
            continue
        if not all(labels.get(key) == value for key, value in selector.match_labels.items()):
            continue
        for index, rule in enumerate(stored.spec.rules):
            if rule.concurrency is not None:
                found.append(ConcurrencyRule(f"{stored.namespace}.{stored.name}.{index}", rule.match, rule.concurrency))
    return found


def limit_inbound(local: Json, routes: list[Json], rules: list[ConcurrencyRule]) -> list[Json]:
    """Apply `rules` to the inbound side: the first rule without a match limits `local` (the app's
    cluster) itself; each rule with a match gets a limited copy of it and a route to that copy,
    placed before the catch-all in rule order (the first matching rule decides, like routes).
    Returns the extra clusters."""
    extra = []
    catch_all = routes[-1]
    matched_routes = []
    limited_local = False
    for rule in rules:
        if rule.concurrency.adaptive:
            continue  # the connection manager's filter (adaptive_filters), not a cluster's breaker
        if rule.match is None:
            if not limited_local:  # a second unmatched rule is shadowed by the first
                _limit(local, rule.concurrency)
                limited_local = True
            continue
        cluster = copy.deepcopy(local)
        cluster["name"] = _cluster_name(local["name"], rule.name)
        cluster["load_assignment"]["cluster_name"] = cluster["name"]
        cluster.pop("circuit_breakers", None)
        cluster.get("metadata", {}).get("filter_metadata", {}).pop(METADATA_KEY, None)
        _limit(cluster, rule.concurrency)
        extra.append(cluster)
        matched_routes.append({"match": _route_match(rule.match),
                               "route": {**catch_all["route"], "cluster": cluster["name"]}})  # fmt: skip
    routes[-1:-1] = matched_routes
    return extra


def adaptive_filters(rules: list[ConcurrencyRule]) -> list[Json]:
    """The adaptive concurrency filter for the first adaptive rule (a workload's requests have one
    limit; later RateLimits' adaptive rules are shadowed by the oldest), or none."""
    adaptive = next((rule.concurrency for rule in rules if rule.concurrency.adaptive), None)
    if adaptive is None:
        return []
    limit_params: Json = {"concurrency_update_interval": _seconds(adaptive.update_interval) or DEFAULT_UPDATE_INTERVAL}
    if adaptive.max_concurrent is not None:
        limit_params["max_concurrency_limit"] = adaptive.max_concurrent
    min_rtt: Json = {}
    if adaptive.min_rtt_interval is not None:
        min_rtt["interval"] = _seconds(adaptive.min_rtt_interval)
    if adaptive.min_rtt_requests is not None:
        min_rtt["request_count"] = adaptive.min_rtt_requests
    gradient: Json = {"concurrency_limit_params": limit_params, "min_rtt_calc_params": min_rtt}
    if adaptive.latency_percentile is not None:
        gradient["sample_aggregate_percentile"] = {"value": adaptive.latency_percentile}
    return [{"name": ADAPTIVE_FILTER, "typed_config": {"@type": ADAPTIVE_TYPE, "gradient_controller_config": gradient}}]


def _seconds(duration: object) -> str | None:
    return None if duration is None else f"{duration_seconds(duration):g}s"


def _cluster_name(local: str, rule: str) -> str:
    # inbound|PORT||  →  inbound|PORT|concurrency-NS.NAME.INDEX|
    port = local.split("|")[1]
    return f"inbound|{port}|concurrency-{re.sub(r'[^a-zA-Z0-9_.-]', '-', rule)}|"


def _limit(cluster: Json, concurrency: Concurrency) -> None:
    cluster["circuit_breakers"] = {"thresholds": [{
        # One request per HTTP/1.1 connection to the app: connections bound it there, requests
        # (streams) on HTTP/2.
        "max_connections": concurrency.max_concurrent,
        "max_requests": concurrency.max_concurrent,
        # Envoy (and meshctl, alike) count as pending a request that waits for a connection, also
        # while the connection it asked for opens: `queue` alone would refuse the requests that
        # open a cold sidecar's connections (all of them, with queue 0).
        "max_pending_requests": concurrency.queue + concurrency.max_concurrent,
        "track_remaining": True,
    }]}  # fmt: skip
    if concurrency.queue_timeout is not None:
        metadata = cluster.setdefault("metadata", {}).setdefault("filter_metadata", {})
        metadata[METADATA_KEY] = {"queue_timeout": f"{duration_seconds(concurrency.queue_timeout):g}s"}


def _route_match(match: RuleMatch) -> Json:
    """The rule's path, method and headers as a route match (all must hold)."""
    route: Json = {"prefix": "/"}
    if match.path is not None:
        route = _path(match.path)
    headers = []
    if match.method is not None:
        headers.append({"name": ":method", "string_match": {"exact": match.method}})
    for name, value in sorted((match.headers or {}).items()):
        headers.append({"name": name, "string_match": string_match(value)})
    if headers:
        route["headers"] = headers
    return route


def _path(path: StringMatch) -> Json:
    if path.exact is not None:
        return {"path": path.exact}
    if path.prefix is not None:
        return {"prefix": path.prefix}
    return {"safe_regex": {"regex": path.regex}}
