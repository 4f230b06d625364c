"""Access logs through the mesh: `meshctl serve`, a reviews instance and a productpage client under
`meshctl run`; `meshctl apply` of a mesh-wide Telemetry makes both sidecars log each request (the
client's outbound side and the server's inbound side) as Istio's JSON on their stderr. A bad
Telemetry is refused by field and leaves the stored one as it was."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from helpers.control_plane import start_control_plane
from helpers.mesh import MeshSidecar, apply, echo_instance, print_logs, registered, stop_all, wait_until
from helpers.ports import free_port

pytestmark = pytest.mark.meshctl_only

TELEMETRY = """\
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  accessLogging:
  - providers: [{name: envoy-json}]
"""


def status_of(port: int, host: str, request_id: str) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/books/1", headers={"Host": host, "x-request-id": request_id})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def json_lines(sidecar: MeshSidecar, request_id: str) -> list[dict]:
    return [json.loads(line) for line in sidecar.log().splitlines() if line.startswith("{") and request_id in line]


def test_a_mesh_wide_telemetry_logs_both_sides_and_bad_ones_are_refused(tmp_path: Path):
    plane = start_control_plane(tmp_path / "plane", "--xds-port", str(free_port()))
    sidecars: list[MeshSidecar] = []
    try:
        reviews = echo_instance(plane.env, tmp_path, "reviews", "v1", lease=1.5)
        client = MeshSidecar(plane.env, tmp_path, "productpage", lease=1.5)
        sidecars += [reviews, client]
        wait_until(lambda: any(s["service"] == "reviews" and s["ready"] for s in registered(plane)), 30, "reviews ready")
        apply(plane, TELEMETRY)

        # Requests until the config has reached both sidecars (each then logs every request).
        attempt = iter(range(1000))

        def logged() -> object:
            request_id = f"rid-{next(attempt)}"
            assert status_of(client.outbound_port, "reviews:9080", request_id) == 200
            return bool(json_lines(client, request_id) and json_lines(reviews, request_id))

        wait_until(logged, 20, "both sidecars log a request", step=0.2)
        assert status_of(client.outbound_port, "reviews:9080", "rid-seen") == 200
        wait_until(lambda: bool(json_lines(client, "rid-seen") and json_lines(reviews, "rid-seen")), 5, "the lines of rid-seen")
        (outbound,) = json_lines(client, "rid-seen")
        (inbound,) = json_lines(reviews, "rid-seen")
        for line in (outbound, inbound):
            assert (line["method"], line["path"], line["response_code"], line["response_flags"]) == ("GET", "/books/1", 200, "-")
        assert outbound["upstream_cluster"].startswith("outbound|9080|") and outbound["upstream_cluster"].endswith("reviews.default.svc.cluster.local")
        assert inbound["upstream_cluster"].startswith("inbound|")
        # Between sidecars: mTLS, and the server side logs the SNI the client sidecar sent.
        assert inbound["requested_server_name"] == "outbound_.9080_._.reviews.default.svc.cluster.local"

        assert status_of(client.outbound_port, "nowhere:9080", "rid-nr") == 404
        wait_until(lambda: bool(json_lines(client, "rid-nr")), 5, "the no-route line")
        assert json_lines(client, "rid-nr")[0]["response_flags"] == "NR"

        # The writer's counters: every line written, none dropped (the channel never filled).
        with urllib.request.urlopen(f"http://127.0.0.1:{client.admin_port}/stats/prometheus", timeout=5) as response:
            stats = response.read().decode()
        written = re.search(r'^meshctl_access_log_written_total\{path="/dev/stderr"\} (\d+)$', stats, re.MULTILINE)
        assert written and int(written.group(1)) >= 3, stats
        assert 'meshctl_access_log_dropped_total{path="/dev/stderr"} 0' in stats

        stored = plane.meshctl("get", "telemetry", "mesh-default", "-n", "istio-system", "-o", "json")
        assert stored.returncode == 0, stored.stderr
        for bad, field in [
            (TELEMETRY.replace("envoy-json", "stackdriver"), "spec.accessLogging[0].providers[0].name"),
            (TELEMETRY + "  tracing:\n  - randomSamplingPercentage: 101\n", "spec.tracing[0].randomSamplingPercentage"),
            (TELEMETRY.replace("- providers", "- match: {mode: EVERYWHERE}\n    providers"), "spec.accessLogging[0].match.mode"),
        ]:
            refused = plane.meshctl("apply", "-f", "-", stdin=bad)
            assert refused.returncode != 0 and field in refused.stderr + refused.stdout, refused.stderr
        again = plane.meshctl("get", "telemetry", "mesh-default", "-n", "istio-system", "-o", "json")
        assert json.loads(again.stdout)["spec"] == json.loads(stored.stdout)["spec"]
    except BaseException:
        print_logs(sidecars, {"": plane}, sidecar_tail=3000, plane_tail=4000)
        raise
    finally:
        stop_all(sidecars, plane)
