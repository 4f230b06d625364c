"""Istio's standard metrics through the mesh: `meshctl serve`, a reviews v1 instance and a
productpage client under `meshctl run`. A request from productpage to reviews (mTLS between the
sidecars) is counted on productpage's sidecar as reporter="source" with reviews' workload labels
(from the registry, over EDS) and on reviews' sidecar as reporter="destination" with productpage's
labels (from the mesh header its sidecar sent, checked against its certificate), mutual_tls. An
app's own x-meshctl-peer header is never believed nor passed on; a fault-injected 503 carries its
flag; a sidecar's series expire and their number is capped."""

from __future__ import annotations

import json
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from helpers.control_plane import start_control_plane
from helpers.mesh import (
    SERVERS,
    MeshSidecar,
    apply,
    echo_instance,
    print_logs,
    registered,
    stop_all,
    wait_until,
)
from helpers.ports import free_port

pytestmark = pytest.mark.meshctl_only

FORGED = "1;evil;kube-system;spiffe://cluster.local/ns/kube-system/sa/admin;evil;v9;evil;v9;elsewhere"

FAULT = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - match: [{headers: {x-fail: {exact: "yes"}}}]
    fault: {abort: {percentage: {value: 100}, httpStatus: 503}}
    route: [{destination: {host: reviews}}]
  - route: [{destination: {host: reviews}}]
"""


def call(port: int, host: str, path: str = "/books/1", headers: dict[str, str] | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Host": host, **(headers or {})})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=5) as response:
            body = response.read()
            return response.status, json.loads(body) if body.startswith(b"{") else {}
    except urllib.error.HTTPError as error:
        return error.code, {}
    except OSError:  # the sidecar's listener is not bound yet
        return 0, {}


def scrape(sidecar: MeshSidecar) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{sidecar.admin_port}/stats/prometheus", timeout=5) as response:
        return response.read().decode()


def series(text: str, metric: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of `metric` whose labels include `labels`."""
    found = []
    for match in re.finditer(rf"^{metric}\{{(.*)\}} (\S+)$", text, re.MULTILINE):
        parsed = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(1)))
        if all(parsed.get(key) == value for key, value in labels.items()):
            found.append((parsed, float(match.group(2))))
    return found


def inbound_port(sidecar: MeshSidecar) -> int:
    args = list(sidecar.popen.args)
    return int(args[args.index("--inbound-port") + 1])


def test_both_sides_name_each_other_and_the_header_cannot_be_forged(tmp_path: Path):
    plane = start_control_plane(tmp_path / "plane", "--xds-port", str(free_port()))
    sidecars: list[MeshSidecar] = []
    try:
        reviews = echo_instance(plane.env, tmp_path, "reviews", "v1", lease=1.5)
        client = MeshSidecar(plane.env, tmp_path, "productpage", lease=1.5)
        sidecars += [reviews, client]
        wait_until(lambda: any(s["service"] == "reviews" and s["ready"] for s in registered(plane)), 30, "reviews ready")
        wait_until(lambda: call(client.outbound_port, "reviews:9080")[0] == 200, 20, "productpage reaches reviews")

        # The app's own mesh header: replaced by its sidecar's, never seen by the callee's app.
        status, echoed = call(client.outbound_port, "reviews:9080", headers={"x-meshctl-peer": FORGED})
        assert status == 200
        assert "x-meshctl-peer" not in echoed["headers"], echoed["headers"]

        source_side = scrape(client)
        ((labels, count),) = series(source_side, "istio_requests_total", reporter="source", response_code="200")
        assert count >= 2
        assert labels["source_workload"] == "productpage" and labels["source_workload_namespace"] == "default"
        assert labels["source_app"] == "productpage" and labels["source_version"] == "unknown"
        assert labels["source_canonical_revision"] == "latest"
        assert (labels["destination_workload"], labels["destination_app"], labels["destination_version"]) == ("reviews-v1", "reviews", "v1")
        assert labels["destination_canonical_service"] == "reviews" and labels["destination_canonical_revision"] == "v1"
        assert labels["destination_principal"].startswith("spiffe://") and labels["destination_principal"].endswith("/ns/default/sa/reviews")
        assert labels["destination_service"] == "reviews.default.svc.cluster.local"
        assert (labels["destination_service_name"], labels["destination_service_namespace"]) == ("reviews", "default")
        assert (labels["request_protocol"], labels["grpc_response_status"], labels["response_flags"]) == ("http", "", "-")
        assert labels["connection_security_policy"] == "unknown"
        assert list(labels)[:3] == ["reporter", "source_workload", "source_canonical_service"], "Istio's label order"
        assert series(source_side, "istio_request_duration_milliseconds_count", reporter="source", response_code="200")
        assert series(source_side, "istio_response_bytes_bucket", reporter="source", response_code="200", le="+Inf")

        destination_side = scrape(reviews)
        mtls = series(destination_side, "istio_requests_total", reporter="destination", connection_security_policy="mutual_tls")
        ((labels, count),) = mtls
        assert count >= 2
        assert (labels["source_workload"], labels["source_app"], labels["source_workload_namespace"]) == ("productpage", "productpage", "default")
        assert labels["source_principal"].endswith("/ns/default/sa/productpage"), labels
        assert (labels["destination_workload"], labels["destination_version"], labels["destination_service_name"]) == ("reviews-v1", "v1", "reviews")
        assert labels["response_code"] == "200"
        assert not series(destination_side, "istio_requests_total", source_workload="evil")

        # Straight to reviews' inbound port, in plaintext (PERMISSIVE): no verified peer, so the
        # header is not believed (the caller is unknown) and still never reaches the app.
        status, echoed = call(inbound_port(reviews), "reviews:9080", headers={"x-meshctl-peer": FORGED})
        assert status == 200 and "x-meshctl-peer" not in echoed["headers"]
        plain = series(scrape(reviews), "istio_requests_total", reporter="destination", connection_security_policy="none")
        ((labels, _),) = plain
        assert (labels["source_workload"], labels["source_principal"], labels["source_workload_namespace"]) == ("unknown", "unknown", "unknown")

        # A fault-injected 503 carries its flag; no route is a 404 with NR.
        apply(plane, FAULT)
        wait_until(lambda: call(client.outbound_port, "reviews:9080", headers={"x-fail": "yes"})[0] == 503, 20, "the fault applies")
        assert series(scrape(client), "istio_requests_total", reporter="source", response_code="503", response_flags="FI")
        assert call(client.outbound_port, "nowhere:9080")[0] == 404
        assert series(scrape(client), "istio_requests_total", reporter="source", response_code="404", response_flags="NR")
    except BaseException:
        print_logs(sidecars, {"": plane}, sidecar_tail=3000, plane_tail=4000)
        raise
    finally:
        stop_all(sidecars, plane)


def test_series_expire_and_their_number_is_capped(tmp_path: Path):
    plane = start_control_plane(tmp_path / "plane", "--xds-port", str(free_port()))
    sidecars: list[MeshSidecar] = []
    try:
        reviews = echo_instance(plane.env, tmp_path, "reviews", "v1", lease=1.5)
        sidecars.append(reviews)
        wait_until(lambda: any(s["service"] == "reviews" and s["ready"] for s in registered(plane)), 30, "reviews ready")
        client = MeshSidecar(plane.env, tmp_path, "cart", "--istio-metrics-max-series", "2", "--istio-metrics-expiry", "3s", lease=1.5)
        sidecars.append(client)
        wait_until(lambda: call(client.outbound_port, "reviews:9080")[0] == 200, 20, "cart reaches reviews")
        # Waiting for the config may have made other series (503s before reviews' endpoint came):
        # let them all expire first.
        time.sleep(3.5)
        assert not series(scrape(client), "istio_requests_total"), "every series has expired"

        overflow_before = int(re.search(r"^meshctl_istio_series_overflow_total (\d+)$", scrape(client), re.MULTILINE).group(1))
        for status in (200, 201, 202, 203):
            assert call(client.outbound_port, "reviews:9080", path=f"/?status={status}")[0] == status
        text = scrape(client)
        codes = sorted(labels["response_code"] for labels, _ in series(text, "istio_requests_total", reporter="source"))
        assert codes == ["200", "201"], text
        assert f"\nmeshctl_istio_series_overflow_total {overflow_before + 2}\n" in text, text
        assert 'meshctl_istio_series{kind="http"} 2' in text

        # An updated series lives on; one left alone expires, which makes room for a new one.
        for _ in range(3):
            time.sleep(1.2)
            assert call(client.outbound_port, "reviews:9080", path="/?status=200")[0] == 200
        assert call(client.outbound_port, "reviews:9080", path="/?status=206")[0] == 206
        codes = sorted(labels["response_code"] for labels, _ in series(scrape(client), "istio_requests_total", reporter="source"))
        assert codes == ["200", "206"]
        # The meshctl_* series stay beside Istio's.
        assert "meshctl_upstream_rq_total{" in scrape(client)

        refused = plane.meshctl("run", "--service", "x", "--istio-metrics-expiry", "soon")
        assert refused.returncode == 2 and "--istio-metrics-expiry" in refused.stderr, refused.stderr
    except BaseException:
        print_logs(sidecars, {"": plane}, sidecar_tail=3000, plane_tail=4000)
        raise
    finally:
        stop_all(sidecars, plane)


def test_grpc_messages_and_status_are_counted_on_both_sides(tmp_path: Path):
    import grpc

    plane = start_control_plane(tmp_path / "plane", "--xds-port", str(free_port()))
    sidecars: list[MeshSidecar] = []
    try:
        app_port = free_port()
        greeter = MeshSidecar(
            plane.env, tmp_path, "greeter", "--version", "v1", "--app-port", str(app_port), "--service-port", "50051",
            "--app-protocol", "grpc", "--inbound-port", str(free_port()),
            command=[sys.executable, str(SERVERS / "grpc_echo.py"), "--name", "g1", "--port", str(app_port)], lease=1.5,
        )  # fmt: skip
        client = MeshSidecar(plane.env, tmp_path, "frontend", lease=1.5)
        sidecars += [greeter, client]
        wait_until(lambda: any(s["service"] == "greeter" and s["ready"] for s in registered(plane)), 30, "greeter ready")
        options = [("grpc.default_authority", "greeter:50051")]
        with grpc.insecure_channel(f"127.0.0.1:{client.outbound_port}", options=options) as channel:
            unary = channel.unary_unary("/meshtest.Echo/Unary")

            def answered() -> object:
                try:
                    return unary(b"hi", timeout=3) == b"g1|hi"
                except grpc.RpcError as error:
                    return f"{error.code()}: {error.details()}"

            wait_until(answered, 20, "a unary call through both sidecars")

            def messages(sidecar: MeshSidecar, reporter: str) -> tuple[float, float]:
                text = scrape(sidecar)
                count = {
                    metric: sum(value for _, value in series(text, metric, reporter=reporter, request_protocol="grpc", grpc_response_status="0"))
                    for metric in ("istio_request_messages_total", "istio_response_messages_total")
                }  # fmt: skip
                return count["istio_request_messages_total"], count["istio_response_messages_total"]

            before = {side: messages(sidecar, side) for side, sidecar in (("source", client), ("destination", greeter))}
            assert list(channel.unary_stream("/meshtest.Echo/ServerStream")(b"4", timeout=5)) == [b"0", b"1", b"2", b"3"]
            assert len(list(channel.stream_stream("/meshtest.Echo/Bidi")(iter([b"a", b"b", b"c"]), timeout=5))) == 3
            with pytest.raises(grpc.RpcError) as failed:
                unary(b"x", timeout=3, metadata=[("x-want-code", "NOT_FOUND")])
            assert failed.value.code() == grpc.StatusCode.NOT_FOUND

        def counted() -> object:
            got = {side: messages(sidecar, side) for side, sidecar in (("source", client), ("destination", greeter))}
            # ServerStream: 1 request, 4 responses; Bidi: 3 and 3.
            wanted = {side: (before[side][0] + 4, before[side][1] + 7) for side in before}
            return got == wanted or f"{got} != {wanted}"

        wait_until(counted, 5, "the messages of both streams on both sidecars")
        for sidecar, reporter in ((client, "source"), (greeter, "destination")):
            text = scrape(sidecar)
            assert series(text, "istio_requests_total", reporter=reporter, request_protocol="grpc", grpc_response_status="5", response_code="200")
        ((labels, _),) = series(scrape(greeter), "istio_requests_total", reporter="destination", grpc_response_status="0")
        assert (labels["source_workload"], labels["destination_workload"], labels["connection_security_policy"]) == ("frontend", "greeter-v1", "mutual_tls")
    except BaseException:
        print_logs(sidecars, {"": plane}, sidecar_tail=3000, plane_tail=4000)
        raise
    finally:
        stop_all(sidecars, plane)
