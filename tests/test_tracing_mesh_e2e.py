"""Distributed tracing through the mesh, into a real Jaeger: `meshctl serve --tracing-provider` names
Jaeger's OTLP port, three sidecars (`meshctl run`) guard the demo's chain productpage → reviews →
ratings (apps that copy the trace headers, as Istio asks), and a mesh-wide Telemetry turns tracing
on. One request in is one trace in Jaeger's query API: a SERVER span where it entered, then per
sidecar hop a CLIENT span on the caller's sidecar and a SERVER span on the callee's, each the child
of the one before, with Envoy's and Istio's tags. At 0 % nothing is recorded unless the caller
sampled; with Jaeger gone requests still succeed and the lost spans are counted; bad Telemetry is
refused by field."""

from __future__ import annotations

import itertools
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from helpers.control_plane import start_control_plane
from helpers.jaeger import Jaeger
from helpers.mesh import SERVERS, MeshSidecar, apply, print_logs, registered, stop_all, wait_until
from helpers.ports import free_port

pytestmark = pytest.mark.meshctl_only

TELEMETRY = """\
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  tracing:
  - providers: [{name: jaeger}]
    randomSamplingPercentage: PERCENT
    customTags:
      team: {literal: {value: bookinfo}}
"""


class Instance:
    """A sidecar and its trace_app; `inbound_port` is where the mesh (or the test) reaches it."""

    def __init__(self, env: dict[str, str], directory: Path, service: str, next_host: str | None = None) -> None:
        app_port, outbound_port, self.inbound_port = free_port(), free_port(), free_port()
        command = [sys.executable, str(SERVERS / "trace_app.py"), "--name", service, "--port", str(app_port)]
        if next_host:
            command += ["--next-host", next_host, "--outbound-port", str(outbound_port)]
        self.sidecar = MeshSidecar(
            env, directory, service, "--version", "v1", "--app-port", str(app_port), "--service-port", "9080",
            "--inbound-port", str(self.inbound_port), command=command, lease=1.5, outbound_port=outbound_port,
        )  # fmt: skip

    def admin(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.sidecar.admin_port}{path}", timeout=5) as response:
            return response.read().decode()

    def counter(self, name: str) -> int:
        found = re.findall(rf"^{name}\{{[^}}]*\}} (\d+)$", self.admin("/stats/prometheus"), re.MULTILINE)
        return sum(int(value) for value in found)


def get(port: int, headers: dict[str, str]) -> tuple[int, float]:
    """One request to productpage's sidecar (as a client outside the mesh would send it): status, seconds."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/productpage", headers={"Host": "productpage:9080", **headers})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    started = time.monotonic()
    try:
        with opener.open(request, timeout=10) as response:
            response.read()
            return response.status, time.monotonic() - started
    except urllib.error.HTTPError as error:
        return error.code, time.monotonic() - started


def tags_of(span: dict) -> dict[str, object]:
    return {tag["key"]: tag["value"] for tag in span["tags"]}


def parent_of(span: dict) -> str | None:
    parents = [ref["spanID"] for ref in span.get("references", []) if ref["refType"] == "CHILD_OF"]
    return parents[0] if parents else None


def test_one_request_is_one_trace_in_jaeger_with_a_client_and_server_span_per_hop(tmp_path: Path):
    jaeger = Jaeger(tmp_path / "jaeger")
    plane = start_control_plane(tmp_path / "plane", "--xds-port", str(free_port()),
                                "--tracing-provider", f"jaeger=127.0.0.1:{jaeger.otlp_port}")  # fmt: skip
    instances: list[Instance] = []
    try:
        ratings = Instance(plane.env, tmp_path, "ratings")
        reviews = Instance(plane.env, tmp_path, "reviews", next_host="ratings:9080")
        productpage = Instance(plane.env, tmp_path, "productpage", next_host="reviews:9080")
        instances += [ratings, reviews, productpage]
        wait_until(lambda: sum(s["ready"] for s in registered(plane)) == 3, 30, "three instances ready")

        def configured(percent: float) -> bool:
            # Both connection managers of every sidecar carry the new tracing config.
            for instance in instances:
                found = re.findall(r'"random_sampling_percent":\s*([\d.]+)', instance.admin("/config_dump"))
                if len(found) < 2 or any(float(value) != percent for value in found):
                    return False
            return True

        apply(plane, TELEMETRY.replace("PERCENT", "100"))
        wait_until(lambda: configured(100.0), 30, "tracing configured on every sidecar", step=0.2)
        # The chain works (each hop's route and endpoints are in place) before the traced request.
        wait_until(lambda: get(productpage.inbound_port, {})[0] == 200, 30, "productpage → reviews → ratings", step=0.2)

        status, _ = get(productpage.inbound_port, {"x-request-id": "rid-one"})
        assert status == 200

        def one_trace() -> list[dict]:
            return jaeger.traces("productpage.default", {"guid:x-request-id": "rid-one"})

        wait_until(lambda: bool(one_trace()) and len(one_trace()[0]["spans"]) >= 5, 30, "the trace of rid-one in Jaeger", step=0.5)
        (trace,) = one_trace()
        services = {key: process["serviceName"] for key, process in trace["processes"].items()}
        spans = {(services[span["processID"]], tags_of(span)["span.kind"]): span for span in trace["spans"]}
        assert len(trace["spans"]) == 5 and set(spans) == {
            ("productpage.default", "server"), ("productpage.default", "client"),
            ("reviews.default", "server"), ("reviews.default", "client"), ("ratings.default", "server"),
        }, [(services[s["processID"]], s["operationName"]) for s in trace["spans"]]  # fmt: skip
        # Parents: the request's entry, then each hop's CLIENT under the caller's SERVER span and the
        # callee's SERVER under that CLIENT span.
        chain = [("productpage.default", "server"), ("productpage.default", "client"), ("reviews.default", "server"),
                 ("reviews.default", "client"), ("ratings.default", "server")]  # fmt: skip
        assert parent_of(spans[chain[0]]) is None
        for parent, child in itertools.pairwise(chain):
            assert parent_of(spans[child]) == spans[parent]["spanID"], (parent, child)
        # Names: Istio's route decorators.
        assert spans[("productpage.default", "client")]["operationName"] == "reviews.default.svc.cluster.local:9080/*"
        assert spans[("reviews.default", "server")]["operationName"] == "reviews.default.svc.cluster.local:9080/*"
        assert spans[("ratings.default", "server")]["operationName"] == "ratings.default.svc.cluster.local:9080/*"
        client = tags_of(spans[("productpage.default", "client")])
        assert client["http.method"] == "GET"
        assert client["http.url"] == "http://reviews:9080/productpage"
        assert client["http.status_code"] == "200"
        assert client["upstream_cluster"] == "outbound|9080||reviews.default.svc.cluster.local"
        assert client["response_flags"] == "-"
        assert client["peer.address"] == "127.0.0.1"
        assert client["istio.canonical_service"] == "productpage"
        assert client["istio.namespace"] == "default"
        assert client["guid:x-request-id"] == "rid-one"
        assert client["component"] == "proxy"
        assert client["team"] == "bookinfo"
        assert client["node_id"]
        assert "error" not in client
        server = tags_of(spans[("ratings.default", "server")])
        assert server["upstream_cluster"].startswith("inbound|") and server["istio.canonical_service"] == "ratings"
        # Each span lasts the request's own time, the callee's within the caller's.
        outer, inner = spans[("productpage.default", "client")], spans[("reviews.default", "server")]
        assert outer["startTime"] <= inner["startTime"] and inner["duration"] <= outer["duration"]
        assert productpage.counter("meshctl_tracing_spans_exported_total") >= 2

        # Malformed trace headers fail nothing: the request starts a trace of its own.
        malformed = {"x-request-id": "rid-malformed", "traceparent": "00-not-a-trace-01", "b3": "garbage"}
        assert get(productpage.inbound_port, malformed)[0] == 200
        wait_until(lambda: len(jaeger.traces("productpage.default", {"guid:x-request-id": "rid-malformed"})) == 1, 30,
                   "the malformed request's own trace", step=0.5)  # fmt: skip
        (fresh,) = jaeger.traces("productpage.default", {"guid:x-request-id": "rid-malformed"})
        roots = [span for span in fresh["spans"] if parent_of(span) is None]
        assert len(roots) == 1 and tags_of(roots[0])["istio.canonical_service"] == "productpage"

        # 0 %: nothing is recorded... unless the caller decided to sample (W3C flag 01).
        apply(plane, TELEMETRY.replace("PERCENT", "0"))
        wait_until(lambda: configured(0.0), 30, "0 % on every sidecar", step=0.2)
        assert get(productpage.inbound_port, {"x-request-id": "rid-unsampled"})[0] == 200
        trace_id, caller_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
        forced = {"x-request-id": "rid-forced", "traceparent": f"00-{trace_id}-{caller_span}-01"}
        assert get(productpage.inbound_port, forced)[0] == 200
        wait_until(lambda: len((jaeger.trace(trace_id) or [{"spans": []}])[0]["spans"]) >= 5, 30, "the caller-sampled trace", step=0.5)
        (sampled,) = jaeger.trace(trace_id)
        entry = [s for s in sampled["spans"] if tags_of(s)["span.kind"] == "server" and tags_of(s)["istio.canonical_service"] == "productpage"]
        assert len(entry) == 1 and parent_of(entry[0]) == caller_span
        # Its spans were queued after the unsampled request's would have been: none came.
        assert jaeger.traces("productpage.default", {"guid:x-request-id": "rid-unsampled"}) == []

        # Jaeger gone: requests are as fast and successful as before; the spans are lost, counted.
        jaeger.stop()
        failed_before = productpage.counter("meshctl_tracing_spans_failed_total")
        for attempt in range(5):
            status, seconds = get(productpage.inbound_port, {"traceparent": f"00-{trace_id}-{caller_span}-01"})
            assert status == 200 and seconds < 2, (attempt, status, seconds)
        wait_until(lambda: productpage.counter("meshctl_tracing_spans_failed_total") >= failed_before + 10, 30,
                   "the lost spans counted", step=0.5)  # fmt: skip

        # Bad Telemetry is refused by field; the stored one stays.
        for bad, field in [
            (TELEMETRY.replace("PERCENT", "101"), "spec.tracing[0].randomSamplingPercentage"),
            (TELEMETRY.replace("PERCENT", "-1"), "spec.tracing[0].randomSamplingPercentage"),
            (TELEMETRY.replace("PERCENT", "5").replace("name: jaeger", "name: zipkin"), "spec.tracing[0].providers[0].name"),
        ]:
            refused = plane.meshctl("apply", "-f", "-", stdin=bad)
            assert refused.returncode != 0 and field in refused.stderr + refused.stdout, refused.stderr
    except BaseException:
        print_logs([i.sidecar for i in instances], {"": plane}, sidecar_tail=3000, plane_tail=3000)
        print(jaeger.log_path.read_text(errors="replace")[-3000:])
        raise
    finally:
        stop_all([i.sidecar for i in instances], plane)
        jaeger.stop()
