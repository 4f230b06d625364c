"""Outlier detection and the panic threshold, the same bootstrap on Envoy 1.40 and `meshctl run`.

A STATIC round-robin cluster of two endpoints: one good (the echo upstream), one bad (always 503,
tests/servers/status_server.py) or dead (a closed port). What each endpoint received is counted
from the `x-upstream` header of the answers; ejections from each data plane's own counters under
Envoy's names (`cluster.upstream.outlier_detection.*` on Envoy's /stats; meshctl spells them
`meshctl_outlier_detection_*` with a `cluster` label on /stats/prometheus).

Where the planes may legitimately differ by a request or two, it is because Envoy decides an
ejection on its main thread and then updates the worker's host set, so a request or two sent
meanwhile still reach the ejected host; meshctl ejects before the failing response is returned.
"""

from __future__ import annotations

import re
import socket
import time
import urllib.request
from collections import Counter

import h11
import pytest

from helpers import bootstrap as b
from helpers.http_client import Http1Client, Response
from helpers.ports import free_port
from helpers.procs import start_upstream


@pytest.fixture(scope="session")
def bad_a(upstream_logs):
    process = start_upstream("status_server.py", upstream_logs, "--name", "bad-a", "--status", "503")
    yield process
    process.stop()


@pytest.fixture(scope="session")
def bad_b(upstream_logs):
    process = start_upstream("status_server.py", upstream_logs, "--name", "bad-b", "--status", "503")
    yield process
    process.stop()


class Stats:
    """A cluster's counters under Envoy's names, read from either data plane's admin port."""

    def __init__(self, kind: str, admin_port: int, cluster: str = "upstream") -> None:
        self.kind, self.admin_port, self.cluster = kind, admin_port, cluster

    def get(self, name: str) -> int:
        """`name` as Envoy's stat under `cluster.<name>.`, e.g. `outlier_detection.ejections_active`."""
        if self.kind == "envoy":
            for line in self._fetch("/stats").splitlines():
                key, _, value = line.partition(": ")
                if key == f"cluster.{self.cluster}.{name}":
                    return int(value)
            raise AssertionError(f"cluster.{self.cluster}.{name} is missing from Envoy's /stats")
        metric = "meshctl_" + name.replace(".", "_")
        if name != "outlier_detection.ejections_active" and not metric.endswith("_total"):
            metric += "_total"
        series = f'{metric}{{cluster="{self.cluster}"}}'
        found = re.search(rf"^{re.escape(series)} (\d+)$", self._fetch("/stats/prometheus"), re.MULTILINE)
        assert found, f"{series} is missing from /stats/prometheus"
        return int(found.group(1))

    def _fetch(self, path: str) -> str:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5) as response:
            return response.read().decode()


def start(
    dataplane,
    kind: str,
    endpoint_ports: list[int],
    detection: dict | None,
    panic_threshold: float | None = None,
    *,
    http2: bool = False,
    unhealthy: tuple[int, ...] = (),
):
    """A listener routing to cluster `upstream` (round robin over `endpoint_ports`, those listed in
    `unhealthy` marked UNHEALTHY); its port and Stats."""
    port, admin = free_port(), free_port()
    cluster = b.cluster("upstream", endpoint_ports[0], http2=http2)
    cluster["lb_policy"] = "ROUND_ROBIN"
    cluster["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
        {"endpoint": {"address": b.socket_address(p)}, **({"health_status": "UNHEALTHY"} if p in unhealthy else {})}
        for p in endpoint_ports
    ]
    if detection is not None:
        cluster["outlier_detection"] = detection
    if panic_threshold is not None:
        cluster["common_lb_config"] = {"healthy_panic_threshold": {"value": panic_threshold}}
    routes = b.route_configuration("local", [b.virtual_host("all", [b.route("upstream")])])
    config = b.bootstrap([b.http_listener("http", port, routes)], [cluster])
    config["admin"] = {"address": b.socket_address(admin)}
    dataplane(config)
    return port, Stats(kind, admin)


def who(response: Response) -> str:
    """The endpoint that answered, or `local <status>` for the proxy's own reply."""
    return response.headers.get("x-upstream") or f"local {response.status}"


def send(client: Http1Client, n: int, spacing: float = 0.0) -> list[tuple[float, str]]:
    answers = []
    for _ in range(n):
        answers.append((time.monotonic(), who(client.get("/"))))
        if spacing:
            time.sleep(spacing)
    return answers


def send_until(client: Http1Client, predicate, timeout: float, spacing: float = 0.05) -> list[tuple[float, str]]:
    """Requests every `spacing` s until `predicate(answers)` holds; fails after `timeout`."""
    answers: list[tuple[float, str]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answers.append((time.monotonic(), who(client.get("/"))))
        if predicate(answers):
            return answers
        time.sleep(spacing)
    raise AssertionError(f"not seen within {timeout} s: {Counter(a for _, a in answers)}")


def nth(answers: list[tuple[float, str]], name: str, n: int) -> float:
    """When the n-th answer from `name` arrived."""
    return [t for t, a in answers if a == name][n - 1]


DETECTION = {"consecutive_5xx": 3, "interval": "1s", "base_ejection_time": "5s", "max_ejection_percent": 50}


def test_consecutive_5xx_ejects_the_bad_endpoint_and_readmits_it_for_twice_as_long(dataplane, dataplane_kind, echo_a, bad_a):
    port, stats = start(dataplane, dataplane_kind, [echo_a.port, bad_a.port], DETECTION)
    client = Http1Client(port)

    answers = send(client, 200)
    counts = Counter(a for _, a in answers)
    assert set(counts) == {"a", "bad-a"}, counts
    # Three 503s in a row eject it at once (a request or two more on Envoy, see the docstring).
    assert 3 <= counts["bad-a"] <= 5, counts
    assert stats.get("outlier_detection.ejections_enforced_consecutive_5xx") == 1
    assert stats.get("outlier_detection.ejections_enforced_total") == 1
    assert stats.get("outlier_detection.ejections_active") == 1
    ejected = nth(answers, "bad-a", 3)

    # Back after base_ejection_time, at the first interval sweep from then (5 to 6 s).
    answers = send_until(client, lambda got: got[-1][1] == "bad-a", timeout=10)
    back = answers[-1][0]
    assert 4.8 <= back - ejected <= 6.6, f"back after {back - ejected:.2f} s"
    # Still failing: ejected again by its third 503 since (the first was the one just seen).
    answers = answers[-1:] + send_until(client, lambda got: sum(a == "bad-a" for _, a in got) >= 2, timeout=5, spacing=0.02)
    ejected_again = nth(answers, "bad-a", 3)
    assert stats.get("outlier_detection.ejections_enforced_consecutive_5xx") == 2
    assert stats.get("outlier_detection.ejections_active") == 1
    # The balancer took the return less than update_merge_window (1 s by default) ago: it learns
    # of this ejection only when that window ends, and balances over the endpoint until then.
    time.sleep(1.2)
    # Out for 2 × 5 s this time (back at the first sweep after that).
    answers = send_until(client, lambda got: got[-1][1] == "bad-a", timeout=15, spacing=0.1)
    back_again = answers[-1][0]
    assert 9.8 <= back_again - ejected_again <= 11.7, f"back after {back_again - ejected_again:.2f} s"
    assert stats.get("outlier_detection.ejections_active") == 0


@pytest.mark.parametrize(
    "detection, counter",
    [
        pytest.param(
            {"split_external_local_origin_errors": True, "consecutive_local_origin_failure": 3},
            "ejections_enforced_consecutive_local_origin_failure",
            id="local-origin",
        ),
        pytest.param(
            {"consecutive_5xx": 0, "consecutive_gateway_failure": 3, "enforcing_consecutive_gateway_failure": 100},
            "ejections_enforced_consecutive_gateway_failure",
            id="gateway",
        ),
    ],
)
def test_a_dead_endpoint_is_ejected_within_the_first_requests(dataplane, dataplane_kind, echo_a, detection, counter):
    dead = free_port()  # nothing listens: every connect is refused
    detection = {"interval": "1s", "base_ejection_time": "30s", "max_ejection_percent": 50, **detection}
    port, stats = start(dataplane, dataplane_kind, [echo_a.port, dead], detection)
    client = Http1Client(port)

    counts = Counter(a for _, a in send(client, 60))
    # The dead endpoint's tries are the proxy's own 503s (connection refused, flag UF).
    assert set(counts) == {"a", "local 503"}, counts
    assert 3 <= counts["local 503"] <= 5, counts
    assert stats.get(f"outlier_detection.{counter}") == 1
    assert stats.get("outlier_detection.ejections_active") == 1


PANIC_DETECTION = {"consecutive_5xx": 3, "interval": "1s", "base_ejection_time": "30s", "max_ejection_percent": 100}


def eject_both(client: Http1Client, stats: Stats) -> list[tuple[float, str]]:
    """Send until both endpoints are ejected, and until the balancer knows: the second ejection
    comes within update_merge_window (1 s) of the first, so it reaches the balancer 1 s later."""
    answers = send_until(client, lambda _: stats.get("outlier_detection.ejections_active") == 2, timeout=5, spacing=0)
    time.sleep(1.2)
    return answers


@pytest.mark.parametrize("threshold", [None, 50.0], ids=["default", "50"])
def test_with_every_endpoint_ejected_panic_mode_balances_over_all_of_them(dataplane, dataplane_kind, bad_a, bad_b, threshold):
    port, stats = start(dataplane, dataplane_kind, [bad_a.port, bad_b.port], PANIC_DETECTION, threshold)
    client = Http1Client(port)
    eject_both(client, stats)

    counts = Counter(a for _, a in send(client, 40))
    assert set(counts) == {"bad-a", "bad-b"}, counts
    assert min(counts.values()) >= 10, counts
    assert stats.get("lb_healthy_panic") >= 40


def test_with_panic_mode_off_every_endpoint_ejected_is_no_healthy_upstream(dataplane, dataplane_kind, bad_a, bad_b):
    port, stats = start(dataplane, dataplane_kind, [bad_a.port, bad_b.port], PANIC_DETECTION, 0.0)
    client = Http1Client(port)
    answers = eject_both(client, stats)
    assert {a for _, a in answers} <= {"bad-a", "bad-b"}

    responses = [client.get("/") for _ in range(20)]
    assert {(r.status, who(r)) for r in responses} == {(503, "local 503")}
    bodies = {r.body for r in responses}
    if dataplane_kind == "envoy":
        assert bodies == {b"no healthy upstream"}, bodies
    else:
        # Deliberately different: meshctl's reply also names the cluster (easier to debug); the
        # status, and the flag (UH) on meshctl_upstream_rq_response_flags_total, are Envoy's.
        assert bodies == {b'no healthy upstream in cluster "upstream"'}, bodies
    assert stats.get("upstream_cx_none_healthy") >= 20
    assert stats.get("lb_healthy_panic") == 0


@pytest.mark.parametrize("always_eject_one_host", [False, True])
def test_max_ejection_percent_below_one_host_ejects_none_unless_always_eject_one_host(
    dataplane, dataplane_kind, echo_a, bad_a, always_eject_one_host
):
    # Envoy 1.40's rule: an ejection must keep the ejected share within max_ejection_percent
    # (here the default 10%; one of two endpoints is 50%) unless always_eject_one_host is set.
    detection = {"consecutive_5xx": 3, "interval": "1s", "base_ejection_time": "30s"}
    if always_eject_one_host:
        detection["always_eject_one_host"] = True
    port, stats = start(dataplane, dataplane_kind, [echo_a.port, bad_a.port], detection)
    client = Http1Client(port)

    counts = Counter(a for _, a in send(client, 60))
    detected = stats.get("outlier_detection.ejections_detected_consecutive_5xx")
    if always_eject_one_host:
        assert 3 <= counts["bad-a"] <= 5, counts
        assert stats.get("outlier_detection.ejections_active") == 1
        assert stats.get("outlier_detection.ejections_overflow") == 0
        assert detected == 1
    else:
        assert counts["bad-a"] == 30, counts
        assert stats.get("outlier_detection.ejections_active") == 0
        # Each run of three 5xx is detected and overflows (the run's counter is reset either way);
        # so is each run of five gateway failures (503 is one), though its ejection would not
        # even be enforced (enforcing_consecutive_gateway_failure defaults to 0): the limit is
        # checked first. 30 failures: 10 + 6 (Envoy resets a counter a moment after the
        # detection, on its main thread, so it may see fewer).
        gateway = stats.get("outlier_detection.ejections_detected_consecutive_gateway_failure")
        assert 5 <= detected <= 10 and 3 <= gateway <= 6, (detected, gateway)
        assert stats.get("outlier_detection.ejections_overflow") == detected + gateway
        assert stats.get("outlier_detection.ejections_enforced_total") == 0



def test_grpc_errors_count_as_envoy_maps_their_grpc_status(dataplane, dataplane_kind, grpc_upstream):
    """A trailers-only gRPC error comes with HTTP 200: Envoy counts its grpc-status as the HTTP
    status gRPC maps it to (UNAVAILABLE 503 and INTERNAL 500 are failures, NOT_FOUND 404 is not)."""
    import grpc

    detection = {"consecutive_5xx": 3, "interval": "1s", "base_ejection_time": "30s", "max_ejection_percent": 100}
    port, stats = start(dataplane, dataplane_kind, [grpc_upstream.port], detection, 0.0, http2=True)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        unary = channel.unary_unary("/meshtest.Echo/Unary", request_serializer=None, response_deserializer=None)

        def call(code: str | None) -> tuple[grpc.StatusCode, str | None]:
            metadata = [("x-want-code", code)] if code else []
            try:
                _, answer = unary.with_call(b"x", metadata=metadata, timeout=10)
            except grpc.RpcError as error:
                answer = error
            return answer.code(), dict(answer.trailing_metadata() or ()).get("x-upstream")

        for code in ["NOT_FOUND"] * 5 + ["UNAVAILABLE", "INTERNAL"] + [None] + ["UNAVAILABLE", "INTERNAL"]:
            assert call(code)[1] == "g", code
        assert stats.get("outlier_detection.ejections_enforced_total") == 0
        assert call("UNAVAILABLE") == (grpc.StatusCode.UNAVAILABLE, "g")
        assert stats.get("outlier_detection.ejections_enforced_consecutive_5xx") == 1
        # Its only endpoint ejected and panic mode off: the proxy's own UNAVAILABLE.
        assert call(None) == (grpc.StatusCode.UNAVAILABLE, None)


@pytest.mark.parametrize("threshold, expected", [(None, {"a", "b", "bad-a"}), (0.0, {"a"})], ids=["default", "0"])
def test_endpoints_the_control_plane_marks_unhealthy_count_towards_panic(
    dataplane, dataplane_kind, echo_a, echo_b, bad_a, threshold, expected
):
    """Envoy keeps an UNHEALTHY endpoint: no traffic while enough are healthy, but with one healthy
    of three (33% < 50%) the cluster panics and balances over all three, unless the threshold is 0."""
    port, _ = start(
        dataplane, dataplane_kind, [echo_a.port, echo_b.port, bad_a.port], None, threshold, unhealthy=(echo_b.port, bad_a.port)
    )
    client = Http1Client(port)
    assert set(Counter(a for _, a in send(client, 30))) == expected


def test_a_response_body_the_upstream_breaks_counts_as_a_failure_too(dataplane, dataplane_kind, echo_a, upstream_logs):
    """Envoy counts any upstream reset, one during the body included (a 503-equivalent when errors
    are not split): a 503 whose body is cut off is two failures, so two such answers eject."""
    broken = start_upstream("status_server.py", upstream_logs, "--name", "broken", "--status", "503", "--truncate")
    try:
        port, stats = start(dataplane, dataplane_kind, [echo_a.port, broken.port], DETECTION)
        attempts = Counter()
        for _ in range(20):
            client = Http1Client(port)  # a broken response closes its connection
            try:
                attempts[who(client.get("/"))] += 1
            except (ConnectionError, OSError, h11.ProtocolError):
                attempts["broken"] += 1
            finally:
                client.close()
        # Three would mean the broken bodies were not counted. (Envoy may let one more through
        # while its worker learns of the ejection; it sent exactly two in every run so far.)
        assert attempts["broken"] == 2 or (dataplane_kind == "envoy" and attempts["broken"] == 3), attempts
        assert stats.get("outlier_detection.ejections_enforced_consecutive_5xx") == 1
    finally:
        broken.stop()


def test_clients_that_break_their_request_bodies_eject_no_endpoint(dataplane, dataplane_kind, echo_a, echo_b):
    """A request body the client breaks (invalid chunked encoding, found once the request is on
    its way upstream) is the client's fault, not the endpoint's: the client gets 400 and the
    endpoint is not counted against (as in Envoy). Otherwise any client could eject every
    healthy endpoint with a few broken uploads."""
    port, stats = start(dataplane, dataplane_kind, [echo_a.port, echo_b.port], DETECTION)
    for _ in range(8):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            raw.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            time.sleep(0.1)  # the request is on its way upstream with its first chunk
            raw.sendall(b"zz\r\nnot a chunk\r\n")
            assert raw.recv(100).startswith(b"HTTP/1.1 400"), "the client's own error"
    time.sleep(0.5)
    assert stats.get("outlier_detection.ejections_enforced_total") == 0
    client = Http1Client(port)
    assert {who(client.get("/")) for _ in range(4)} == {"a", "b"}
