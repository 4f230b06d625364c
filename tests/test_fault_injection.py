"""VirtualService fault injection end to end, on both data planes: the control plane compiles
Istio's YAML (the fault-injection task's delay and abort for user jason, percentages, a gRPC
abort) and meshctl and Envoy 1.40 serve the compiled xDS to a real client and real upstreams.

Faults are counted as Envoy's response flags DI and FI (meshctl: per listener in
meshctl_downstream_rq_response_flags_total; Envoy: http.<prefix>.fault.delays_injected and
aborts_injected)."""

from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from meshctl.control.compiler import compile_mesh, sidecar_resources
from meshctl.control.registry import Sidecar

from helpers.compiled_mesh import compiled_bootstrap
from helpers.http_client import Http1Client, Response
from helpers.ports import free_port

RATINGS = "ratings.default.svc.cluster.local"
V1 = f"outbound|9080|v1|{RATINGS}"
GREETER = "greeter.default.svc.cluster.local"
CLIENT = Sidecar(node_id="client", service="productpage", outbound_port=16001)
REGISTRY = [
    Sidecar(node_id="ratings-v1", service="ratings", version="v1", service_port=9080, app_port=8001, inbound_port=9001, ready=True),
    Sidecar(node_id="greeter", service="greeter", service_port=9090, app_port=8003, inbound_port=9003, ready=True, protocol="GRPC"),
    CLIENT,
]  # fmt: skip
DESTINATION_RULE = {
    "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
    "metadata": {"name": "ratings", "namespace": "default"},
    "spec": {"host": "ratings", "subsets": [{"name": "v1", "labels": {"version": "v1"}}]},
}  # fmt: skip
JASON = [{"headers": {"end-user": {"exact": "jason"}}}]


def ratings(*routes: dict) -> dict:
    return {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": "ratings", "namespace": "default"},
            "spec": {"hosts": ["ratings"], "http": list(routes)}}  # fmt: skip


def to_v1(**extra) -> dict:
    return {"route": [{"destination": {"host": "ratings", "subset": "v1"}}], **extra}


class Faults:
    """A data plane's DI and FI counts for the outbound listener."""

    def __init__(self, kind: str, admin_port: int) -> None:
        self.kind, self.admin_port = kind, admin_port

    def read(self) -> dict[str, int]:
        if self.kind == "meshctl":
            text = self._get("/stats/prometheus")
            return {flag: self._series(text, flag) for flag in ("DI", "FI")}
        stats = dict(line.split(": ", 1) for line in self._get("/stats").splitlines() if ": " in line)
        return {"DI": int(stats.get("http.outbound.fault.delays_injected", 0)),
                "FI": int(stats.get("http.outbound.fault.aborts_injected", 0))}  # fmt: skip

    def _series(self, text: str, flag: str) -> int:
        series = f'meshctl_downstream_rq_response_flags_total{{listener="outbound",flag="{flag}"}}'
        found = re.search(rf"^{re.escape(series)} (\d+)$", text, re.MULTILINE)
        assert found, f"{series} is missing"
        return int(found.group(1))

    def _get(self, path: str) -> str:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5) as response:
            return response.read().decode()


def serve(dataplane, virtual_service: dict, backends: dict[str, int]) -> tuple[int, Faults]:
    resources = sidecar_resources(compile_mesh([DESTINATION_RULE, virtual_service], REGISTRY), CLIENT)
    port, admin = free_port(), free_port()
    process = dataplane(compiled_bootstrap(resources, port, admin, backends))
    return port, Faults(process.name, admin)


def get(port: int, user: str | None = None, target: str = "/ratings/0") -> Response:
    headers = [("host", "ratings:9080")] + ([("end-user", user)] if user else [])
    client = Http1Client(port, timeout=20)
    try:
        return client.request("GET", target, headers)
    finally:
        client.close()


def timed(call):
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


def test_istios_delay_task_delays_only_jason(dataplane, echo_a):
    # The task's VirtualService, its 7 s delay shortened to 1 s.
    task = ratings(to_v1(match=JASON, fault={"delay": {"percentage": {"value": 100.0}, "fixedDelay": "1s"}}), to_v1())
    port, faults = serve(dataplane, task, {V1: echo_a.port})
    before = faults.read()
    jason, slow = timed(lambda: get(port, "jason"))
    other, fast = timed(lambda: get(port, "alice"))
    assert jason.status == 200 and jason.json()["name"] == "a", jason.body
    assert other.status == 200
    assert slow >= 0.95, f"jason's request took {slow:.3f}s"
    assert fast < 0.5, f"another user's request took {fast:.3f}s"
    after = faults.read()
    assert after["DI"] - before["DI"] == 1 and after["FI"] == before["FI"]


def test_istios_abort_task_answers_jason_500(dataplane, echo_a):
    task = ratings(to_v1(match=JASON, fault={"abort": {"percentage": {"value": 100.0}, "httpStatus": 500}}), to_v1())
    port, faults = serve(dataplane, task, {V1: echo_a.port})
    before = faults.read()
    aborted = get(port, "jason")
    assert aborted.status == 500
    assert aborted.body == b"fault filter abort"
    assert get(port, "alice").status == 200
    assert faults.read()["FI"] - before["FI"] == 1


def test_a_fifty_percent_abort_lands_within_a_binomial_bound(dataplane, echo_a):
    port, faults = serve(dataplane, ratings(to_v1(fault={"abort": {"percentage": {"value": 50}, "httpStatus": 503}})), {V1: echo_a.port})
    before = faults.read()
    client = Http1Client(port, timeout=20)
    try:
        statuses = [client.request("GET", "/", [("host", "ratings:9080")]).status for _ in range(200)]
    finally:
        client.close()
    aborted = statuses.count(503)
    assert set(statuses) <= {200, 503}
    # Binomial(200, 0.5): mean 100, standard deviation ~7.1; this bound is ~5.6 deviations wide.
    assert 60 <= aborted <= 140, aborted
    assert faults.read()["FI"] - before["FI"] == aborted


def test_a_delay_and_an_abort_together_delay_then_abort(dataplane, echo_a):
    fault = {"delay": {"percentage": {"value": 100}, "fixedDelay": "300ms"}, "abort": {"percentage": {"value": 100}, "httpStatus": 429}}
    port, faults = serve(dataplane, ratings(to_v1(fault=fault)), {V1: echo_a.port})
    before = faults.read()
    response, took = timed(lambda: get(port))
    assert response.status == 429 and took >= 0.28
    after = faults.read()
    assert (after["DI"] - before["DI"], after["FI"] - before["FI"]) == (1, 1)


def test_a_grpc_abort_reaches_a_grpc_client_as_its_status(dataplane, grpc_upstream):
    greeter = {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
               "metadata": {"name": "greeter", "namespace": "default"},
               "spec": {"hosts": ["greeter"], "http": [
                   {"match": [{"headers": {"x-fail": {"exact": "yes"}}}],
                    "fault": {"abort": {"grpcStatus": "UNAVAILABLE", "percentage": {"value": 100}}},
                    "route": [{"destination": {"host": "greeter"}}]},
                   {"route": [{"destination": {"host": "greeter"}}]}]}}  # fmt: skip
    port, faults = serve(dataplane, greeter, {f"outbound|9090||{GREETER}": grpc_upstream.port})
    before = faults.read()
    options = [("grpc.default_authority", "greeter:9090")]
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        unary = channel.unary_unary("/meshtest.Echo/Unary", request_serializer=None, response_deserializer=None)
        assert unary(b"hi", timeout=10) == b"g|hi"
        with pytest.raises(grpc.RpcError) as raised:
            unary(b"hi", timeout=10, metadata=[("x-fail", "yes")])
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert raised.value.details() == "fault filter abort"
    assert faults.read()["FI"] - before["FI"] == 1
