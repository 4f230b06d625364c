"""Access logs end to end on both data planes: a Telemetry resource compiled by the control
plane's compiler into the outbound listener's access_log (Envoy's default text format and
Istio's JSON fields, to stderr), served by meshctl and by Envoy 1.40 to real requests; each log
line must carry the method, path, status and Envoy's response flag of what happened."""

from __future__ import annotations

import json
import re
import time

from meshctl.control.compiler import compile_mesh, sidecar_resources
from meshctl.control.registry import Sidecar
from meshctl.resources import validate_documents

from helpers.compiled_mesh import compiled_bootstrap
from helpers.http_client import Http1Client, Response
from helpers.ports import free_port

CLIENT = Sidecar(node_id="client", service="productpage", outbound_port=16001)
REGISTRY = [
    Sidecar(node_id="ratings", service="ratings", service_port=9080, app_port=8001, inbound_port=9001, ready=True),
    Sidecar(node_id="reviews", service="reviews", service_port=9080, app_port=8002, inbound_port=9002, ready=True),
    Sidecar(node_id="details", service="details", service_port=9080, app_port=8003, inbound_port=9003, ready=True),
    CLIENT,
]  # fmt: skip
RATINGS = "outbound|9080||ratings.default.svc.cluster.local"
REVIEWS = "outbound|9080||reviews.default.svc.cluster.local"
# Both built-in providers at once: Envoy's default text line and Istio's JSON object per request.
TELEMETRY = """
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  accessLogging:
  - providers: [{name: envoy}, {name: envoy-json}]
"""
# [2026-12-07T18:00:00.123Z] "GET /path HTTP/1.1" 200 - 0 93 1 ...
TEXT_LINE = re.compile(r'^\[(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z)\] "(\S+) (\S+) (\S+)" (\d+) (\S+) (\d+) (\d+) (\d+) (\S+) "([^"]*)" "([^"]*)" "([^"]*)" "([^"]*)" "([^"]*)"$')


def serve(dataplane, backends: dict[str, int]):
    stored = [resource.body for resource in validate_documents(TELEMETRY)]
    resources = sidecar_resources(compile_mesh(stored, REGISTRY), CLIENT)
    port, admin = free_port(), free_port()
    return port, dataplane(compiled_bootstrap(resources, port, admin, backends))


def get(port: int, host: str, target: str, request_id: str) -> Response:
    client = Http1Client(port, timeout=20)
    try:
        return client.request("GET", target, [("host", host), ("user-agent", "access-log-test/1"), ("x-request-id", request_id)])
    finally:
        client.close()


def lines_for(process, request_id: str, timeout: float = 10.0) -> tuple[re.Match, dict]:
    """The text and the JSON line of one request, from the data plane's stderr (Envoy flushes
    its access logs every second)."""
    deadline = time.monotonic() + timeout
    while True:
        text = json_line = None
        for line in process.log().splitlines():
            if request_id not in line:
                continue
            if line.startswith("{"):
                json_line = json.loads(line)
            elif found := TEXT_LINE.match(line):
                text = found
        if text and json_line:
            return text, json_line
        assert time.monotonic() < deadline, f"no access log lines for {request_id} in:\n{process.log()[-4000:]}"
        time.sleep(0.1)


def test_text_and_json_lines_carry_what_happened(dataplane, echo_a):
    dead = free_port()  # nothing listens here: the connection is refused
    port, process = serve(dataplane, {RATINGS: echo_a.port, REVIEWS: dead})

    ok = get(port, "ratings:9080", "/ratings/7?x=1", "rid-ok")
    assert ok.status == 200, ok.body
    text, line = lines_for(process, "rid-ok")
    assert text.group(2, 3, 4, 5, 6) == ("GET", "/ratings/7?x=1", "HTTP/1.1", "200", "-")
    assert text.group(12, 13, 14, 15) == ("access-log-test/1", "rid-ok", "ratings:9080", f"127.0.0.1:{echo_a.port}")
    assert int(text.group(8)) == len(ok.body)  # bytes sent: the body the client got
    assert line["method"] == "GET" and line["path"] == "/ratings/7?x=1" and line["protocol"] == "HTTP/1.1"
    assert line["response_code"] == 200 and line["response_flags"] == "-"
    assert line["response_code_details"] == "via_upstream"
    assert line["upstream_cluster"] == RATINGS and line["upstream_host"] == f"127.0.0.1:{echo_a.port}"
    assert line["authority"] == "ratings:9080" and line["user_agent"] == "access-log-test/1"
    assert line["bytes_sent"] == len(ok.body) and isinstance(line["duration"], int)
    assert line["x_forwarded_for"] is None and line["downstream_remote_address"].startswith("127.0.0.1:")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["start_time"])

    refused = get(port, "reviews:9080", "/reviews/1", "rid-uf")
    assert refused.status == 503
    text, line = lines_for(process, "rid-uf")
    assert text.group(5) == "503" and "UF" in text.group(6).split(","), text.group(0)
    assert line["response_code"] == 503 and "UF" in line["response_flags"].split(",")
    assert line["path"] == "/reviews/1" and line["upstream_host"] == f"127.0.0.1:{dead}"

    empty = get(port, "details:9080", "/details/1", "rid-uh")
    assert empty.status == 503
    text, line = lines_for(process, "rid-uh")
    assert (text.group(5), text.group(6)) == ("503", "UH")
    assert line["response_flags"] == "UH" and line["response_code_details"] == "no_healthy_upstream"

    unrouted = get(port, "nowhere.example:80", "/x", "rid-nr")
    assert unrouted.status == 404
    text, line = lines_for(process, "rid-nr")
    assert (text.group(2), text.group(3), text.group(5), text.group(6)) == ("GET", "/x", "404", "NR")
    assert line["response_flags"] == "NR" and line["response_code_details"] == "route_not_found"
    assert line["upstream_host"] is None and line["route_name"] is None
