"""Istio's resilience settings in Envoy's terms, as istiod writes them: a VirtualService's retries
as a route's retry_policy (Istio's default policy when a route names none), and a
DestinationRule's connection pool, outlier detection and retry budget on each cluster."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from meshctl.resources.common import duration_seconds
from meshctl.resources.traffic_policy import (
    ConnectionPool,
    LoadBalancer,
    OutlierDetection,
    RetryBudget,
    TrafficPolicy,
)
from meshctl.resources.virtual_service import Retries

Json = dict[str, Any]

# istiod's circuit-breaker thresholds when a DestinationRule sets none: effectively unlimited
# (Envoy's own defaults, 1024 each and 3 retries, would throttle a busy service by surprise).
UNLIMITED = 2**32 - 1
# Istio's default retry policy: what a route without `retries` gets.
DEFAULT_RETRY_ON = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
DEFAULT_ATTEMPTS = 2
DEFAULT_RETRIABLE_CODES = (503,)
PREVIOUS_HOSTS = {
    "name": "envoy.retry_host_predicates.previous_hosts",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
    },
}
HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def seconds(duration: str) -> str:
    return f"{duration_seconds(duration):.3f}s"


def retry_policy(retries: Retries | None) -> Json | None:
    """The route's retry_policy; None when retries are off (attempts: 0)."""
    policy: Json = {
        "retry_on": DEFAULT_RETRY_ON,
        "num_retries": DEFAULT_ATTEMPTS,
        # Another endpoint than the ones already tried, when there is one.
        "retry_host_predicate": [PREVIOUS_HOSTS],
        "host_selection_retry_max_attempts": 5,
        "retriable_status_codes": list(DEFAULT_RETRIABLE_CODES),
    }
    if retries is None:
        return policy
    if not retries.attempts:
        return None
    policy["num_retries"] = retries.attempts
    if retries.retry_on:
        tokens = [token.strip() for token in retries.retry_on.split(",") if token.strip()]
        codes = [int(token) for token in tokens if token.isdigit()]
        conditions = [token for token in tokens if not token.isdigit()]
        if codes and "retriable-status-codes" not in conditions:
            conditions.append("retriable-status-codes")
        policy["retry_on"] = ",".join(conditions)
        if codes:
            policy["retriable_status_codes"] = codes
        else:
            del policy["retriable_status_codes"]
    if retries.per_try_timeout:
        policy["per_try_timeout"] = seconds(retries.per_try_timeout)
    return policy


@dataclass(frozen=True)
class ClusterPolicy:
    """The parts of a traffic policy that apply to one cluster (host, port, subset)."""

    load_balancer: LoadBalancer | None = None
    connection_pool: ConnectionPool | None = None
    outlier_detection: OutlierDetection | None = None
    retry_budget: RetryBudget | None = None


def cluster_policy(host_policy: TrafficPolicy | None, subset_policy: TrafficPolicy | None, port: int) -> ClusterPolicy:
    """Istio's precedence, each part replaced whole: the host's policy, its settings for this
    port, the subset's policy, the subset's settings for this port."""
    merged = ClusterPolicy()
    for policy in (host_policy, subset_policy):
        if policy is None:
            continue
        merged = _override(merged, policy)
        for port_policy in policy.port_level_settings or []:
            if port_policy.port.number == port:
                merged = _override(merged, port_policy)
        if policy.retry_budget is not None:
            merged = replace(merged, retry_budget=policy.retry_budget)
    return merged


def _override(merged: ClusterPolicy, policy: Any) -> ClusterPolicy:
    for part in ("load_balancer", "connection_pool", "outlier_detection"):
        if getattr(policy, part) is not None:
            merged = replace(merged, **{part: getattr(policy, part)})
    return merged


def apply_cluster_policy(cluster: Json, policy: ClusterPolicy) -> Json:
    """Circuit breakers (always: unlimited unless set), connection settings, outlier detection."""
    pool = policy.connection_pool or ConnectionPool()
    tcp, http = pool.tcp, pool.http
    threshold: Json = {
        # Istio treats 0 as unset for these counts.
        "max_connections": (tcp and tcp.max_connections) or UNLIMITED,
        "max_pending_requests": (http and http.http1_max_pending_requests) or UNLIMITED,
        "max_requests": (http and http.http2_max_requests) or UNLIMITED,
        "max_retries": (http and http.max_retries) or UNLIMITED,
        "track_remaining": True,
    }
    if policy.retry_budget is not None:
        budget: Json = {}
        if policy.retry_budget.percent is not None:
            budget["budget_percent"] = {"value": policy.retry_budget.percent}
        if policy.retry_budget.min_retry_concurrency is not None:
            budget["min_retry_concurrency"] = policy.retry_budget.min_retry_concurrency
        threshold["retry_budget"] = budget
    cluster["circuit_breakers"] = {"thresholds": [threshold]}
    if tcp and tcp.connect_timeout:
        cluster["connect_timeout"] = seconds(tcp.connect_timeout)
    common: Json = {}
    if http and http.max_requests_per_connection:
        common["max_requests_per_connection"] = http.max_requests_per_connection
    if http and http.idle_timeout:
        common["idle_timeout"] = seconds(http.idle_timeout)
    if common:
        protocol_options(cluster)["common_http_protocol_options"] = common
    if policy.outlier_detection is not None:
        cluster["outlier_detection"] = outlier_detection(policy.outlier_detection)
        # istiod turns Envoy's panic mode off unless minHealthPercent says otherwise: with few
        # instances per service, balancing over ejected ones defeats the ejection.
        minimum = policy.outlier_detection.min_health_percent or 0
        cluster.setdefault("common_lb_config", {})["healthy_panic_threshold"] = {"value": float(minimum)}
    return cluster


def outlier_detection(outlier: OutlierDetection) -> Json:
    """Istio's translation: success-rate ejection off; a threshold of 0 is not enforced."""
    out: Json = {"enforcing_success_rate": 0}
    if outlier.consecutive_5xx_errors is not None:
        out["consecutive_5xx"] = outlier.consecutive_5xx_errors
        out["enforcing_consecutive_5xx"] = 100 if outlier.consecutive_5xx_errors else 0
    if outlier.consecutive_gateway_errors is not None:
        out["consecutive_gateway_failure"] = outlier.consecutive_gateway_errors
        out["enforcing_consecutive_gateway_failure"] = 100 if outlier.consecutive_gateway_errors else 0
    if outlier.interval is not None:
        out["interval"] = seconds(outlier.interval)
    if outlier.base_ejection_time is not None:
        out["base_ejection_time"] = seconds(outlier.base_ejection_time)
    if outlier.max_ejection_percent:
        out["max_ejection_percent"] = outlier.max_ejection_percent
    if outlier.split_external_local_origin_errors:
        out["split_external_local_origin_errors"] = True
        if outlier.consecutive_local_origin_failures:
            out["consecutive_local_origin_failure"] = outlier.consecutive_local_origin_failures
            out["enforcing_consecutive_local_origin_failure"] = 100
        out["enforcing_local_origin_success_rate"] = 0
    return out


def protocol_options(cluster: Json) -> Json:
    """The cluster's HttpProtocolOptions, created for HTTP/1.1 if it has none yet."""
    options = cluster.setdefault("typed_extension_protocol_options", {})
    return options.setdefault(
        HTTP_PROTOCOL_OPTIONS,
        {
            "@type": f"type.googleapis.com/{HTTP_PROTOCOL_OPTIONS}",
            "explicit_http_config": {"http_protocol_options": {}},
        },
    )
