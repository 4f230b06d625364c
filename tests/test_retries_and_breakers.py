"""Retries (route and virtual-host retry_policy) and cluster circuit breakers, on both data planes.

The upstream (tests/servers/retry_upstream.py) fails the first N requests of a key in a chosen
way and counts what it received; each test uses keys of its own. Counters are read from each
data plane's admin port under Envoy's names (meshctl spells them meshctl_<name>_total).
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from helpers import bootstrap as b
from helpers.http_client import Http1Client, Response
from helpers.ports import free_port
from helpers.procs import Process, start_upstream

PREVIOUS_HOSTS = {
    "name": "envoy.retry_host_predicates.previous_hosts",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"},
}
OVERFLOW_BODY = b"upstream connect error or disconnect/reset before headers. reset reason: overflow"


@pytest.fixture(scope="module")
def flaky(upstream_logs: Path):
    process = start_upstream("retry_upstream.py", upstream_logs)
    yield process
    process.stop()


def key() -> str:
    return uuid.uuid4().hex[:12]


def upstream_stats(upstream: Process, key_name: str) -> dict:
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
        f"http://127.0.0.1:{upstream.port}/__stats?key={key_name}", timeout=5
    ) as response:
        return json.loads(response.read())


class Counters:
    """A data plane's counters for cluster `upstream`, by Envoy's stat names."""

    NAMES = (
        "upstream_cx_total",
        "upstream_rq_active",
        "upstream_rq_pending_active",
        "upstream_rq_retry",
        "upstream_rq_retry_success",
        "upstream_rq_retry_overflow",
        "upstream_rq_retry_limit_exceeded",
        "upstream_rq_pending_overflow",
        "upstream_rq_active_overflow",
        "upstream_cx_overflow",
        "upstream_rq_per_try_timeout",
    )

    def __init__(self, kind: str, admin_port: int, cluster: str = "upstream") -> None:
        self.kind, self.admin_port, self.cluster = kind, admin_port, cluster

    def read(self) -> dict[str, int]:
        if self.kind == "meshctl":
            text = self._get("/stats/prometheus")
            values = {
                name: self._series(text, f"meshctl_{name}" if name.endswith(("_active", "_total")) else f"meshctl_{name}_total")
                for name in self.NAMES
            }
            values["upstream_rq_retry_active"] = self._series(text, "meshctl_upstream_rq_retry_active")
            # Counted when a retry is wanted for a request whose body outgrew the buffer.
            values["retry_skipped_body_too_large"] = self._series(text, "meshctl_upstream_rq_retry_skipped_body_too_large_total")
            for flag in ("UH", "UF", "UO", "URX", "UT", "UR"):
                values[f"flag_{flag}"] = self._series(text, "meshctl_upstream_rq_response_flags_total", f',flag="{flag}"')
            return values
        stats = {}
        for line in self._get("/stats").splitlines():
            name, _, value = line.partition(": ")
            if value.strip().isdigit():
                stats[name] = int(value)
        values = {name: stats.get(f"cluster.{self.cluster}.{name}", 0) for name in self.NAMES}
        # Envoy's nearest, counted when a body outgrows the retry buffer (retry wanted or not).
        values["retry_skipped_body_too_large"] = stats.get(f"cluster.{self.cluster}.retry_or_shadow_abandoned", 0)
        return values

    def _series(self, text: str, metric: str, extra: str = "") -> int:
        series = f'{metric}{{cluster="{self.cluster}"{extra}}}'
        found = re.search(rf"^{re.escape(series)} (\d+)$", text, re.MULTILINE)
        assert found, f"{series} is missing from /stats/prometheus"
        return int(found.group(1))

    def _get(self, path: str) -> str:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5) as response:
            return response.read().decode()


def endpoint(port: int) -> dict:
    return {"endpoint": {"address": b.socket_address(port)}}


def proxy(
    listener_port: int,
    admin_port: int,
    upstream_ports: list[int],
    *,
    route_action: dict | None = None,
    route: dict | None = None,
    virtual_host: dict | None = None,
    cluster: dict | None = None,
    http2: bool = False,
) -> dict:
    routes = b.route_configuration(
        "local", [b.virtual_host("all", [{**b.route("upstream", **(route_action or {})), **(route or {})}], **(virtual_host or {}))]
    )
    upstream = b.cluster("upstream", upstream_ports[0], http2=http2)
    upstream["load_assignment"]["endpoints"] = [{"lb_endpoints": [endpoint(p) for p in upstream_ports]}]
    upstream.update(cluster or {})
    config = b.bootstrap([b.http_listener("http", listener_port, routes)], [upstream])
    config["admin"] = {"address": b.socket_address(admin_port)}
    return config


def started(dataplane, upstream_ports: list[int], **options) -> tuple[int, Counters]:
    port, admin = free_port(), free_port()
    process = dataplane(proxy(port, admin, upstream_ports, **options))
    return port, Counters(process.name, admin)


def get(port: int, target: str, headers: list[tuple[str, str]] | None = None, timeout: float = 20.0) -> Response:
    client = Http1Client(port, timeout=timeout)
    try:
        return client.request("GET", target, headers)
    finally:
        client.close()


def increase(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {name: after[name] - before[name] for name in after if after[name] != before[name]}


def settled(counters: Counters) -> dict[str, int]:
    """The counters once no request is active or pending any more (nothing leaked a lease)."""
    deadline = time.monotonic() + 5
    while True:
        values = counters.read()
        idle = values["upstream_rq_active"] == 0 and values["upstream_rq_pending_active"] == 0
        if idle and values.get("upstream_rq_retry_active", 0) == 0:
            return values
        assert time.monotonic() < deadline, f"requests still counted active: {values}"
        time.sleep(0.05)


def test_a_503_then_200_is_retried_on_5xx(dataplane, flaky):
    port, counters = started(dataplane, [flaky.port], route_action={"retry_policy": {"retry_on": "5xx"}})
    before = counters.read()
    k = key()
    response = get(port, f"/?key={k}&fail=1&how=503")
    assert response.status == 200, response.body
    assert response.json()["attempt"] == 2
    seen = upstream_stats(flaky, k)
    assert seen["count"] == 2
    # Envoy adds x-envoy-attempt-count only when asked (include_request_attempt_count).
    assert seen["attempt_headers"] == [None, None]
    assert "x-envoy-attempt-count" not in response.headers
    changed = increase(before, settled(counters))
    assert changed.get("upstream_rq_retry") == 1
    assert changed.get("upstream_rq_retry_success") == 1
    assert "upstream_rq_retry_limit_exceeded" not in changed
    # Envoy resets the retried exchange, closing its HTTP/1.1 connection; meshctl reads the rest
    # of the short 503 body and keeps the connection (the retry may already have opened another).
    assert changed["upstream_cx_total"] in {"envoy": (2,), "meshctl": (1, 2)}[counters.kind]


def test_the_last_failure_is_returned_when_retries_run_out(dataplane, flaky):
    policy = {"retry_on": "gateway-error", "num_retries": 2, "retry_back_off": {"base_interval": "0.005s"}}
    port, counters = started(dataplane, [flaky.port], route_action={"retry_policy": policy})
    before = counters.read()
    k = key()
    response = get(port, f"/?key={k}&fail=10&how=502")
    assert response.status == 502
    assert response.json()["attempt"] == 3, "the third try's own response"
    assert upstream_stats(flaky, k)["count"] == 3
    changed = increase(before, counters.read())
    assert changed.get("upstream_rq_retry") == 2
    assert changed.get("upstream_rq_retry_limit_exceeded") == 1
    if counters.kind == "meshctl":
        assert changed.get("flag_URX") == 1


def test_connect_failures_go_to_the_live_endpoint(dataplane, flaky):
    dead = free_port()
    policy = {
        "retry_on": "connect-failure",
        "num_retries": 3,
        "retry_host_predicate": [PREVIOUS_HOSTS],
        "host_selection_retry_max_attempts": 3,
        "retry_back_off": {"base_interval": "0.001s"},
    }
    port, counters = started(dataplane, [dead, flaky.port], route_action={"retry_policy": policy})
    k = key()
    client = Http1Client(port)
    statuses = [client.get(f"/?key={k}").status for _ in range(200)]
    client.close()
    assert statuses.count(200) == 200, sorted(set(statuses))
    assert upstream_stats(flaky, k)["count"] == 200
    assert counters.read()["upstream_rq_retry"] >= 50, "round robin sends about half the first tries to the dead port"


def test_a_policy_that_retries_nothing(dataplane, flaky):
    port, counters = started(dataplane, [flaky.port], route_action={"retry_policy": {"num_retries": 3}})
    k = key()
    assert get(port, f"/?key={k}&fail=1&how=503").status == 503
    assert upstream_stats(flaky, k)["count"] == 1


def test_a_failure_the_policy_does_not_cover_is_returned_as_is(dataplane, flaky):
    port, counters = started(dataplane, [flaky.port], route_action={"retry_policy": {"retry_on": "connect-failure,refused-stream"}})
    before = counters.read()
    k = key()
    response = get(port, f"/?key={k}&fail=1&how=500")
    assert response.status == 500
    assert response.json() == {"key": k, "attempt": 1, "body_length": 0, "body_sha256": response.json()["body_sha256"]}
    assert upstream_stats(flaky, k)["count"] == 1
    assert "upstream_rq_retry" not in increase(before, counters.read())


def test_a_per_try_timeout_retries_and_the_route_timeout_bounds_every_try(dataplane, flaky):
    policy = {"retry_on": "5xx", "num_retries": 3, "per_try_timeout": "0.3s", "retry_back_off": {"base_interval": "0.01s"}}
    port, counters = started(dataplane, [flaky.port], route_action={"retry_policy": policy, "timeout": "5s"})
    before = counters.read()
    k = key()
    began = time.monotonic()
    response = get(port, f"/?key={k}&fail=1&how=hang&hang_ms=3000")
    took = time.monotonic() - began
    assert response.status == 200, response.body
    assert response.json()["attempt"] == 2
    assert 0.25 < took < 2.0, took
    changed = increase(before, counters.read())
    assert changed.get("upstream_rq_per_try_timeout") == 1
    assert changed.get("upstream_rq_retry") == 1

    # Every try hangs: the route's 1 s bounds them all, and the answer is Envoy's 504.
    policy = {"retry_on": "5xx", "num_retries": 10, "per_try_timeout": "0.4s", "retry_back_off": {"base_interval": "0.01s"}}
    port, counters = started(dataplane, [flaky.port], route_action={"retry_policy": policy, "timeout": "1s"})
    k = key()
    began = time.monotonic()
    response = get(port, f"/?key={k}&fail=100&how=hang&hang_ms=5000")
    took = time.monotonic() - began
    assert response.status == 504
    assert response.body == b"upstream request timeout"
    assert 0.9 < took < 2.0, took
    assert 2 <= upstream_stats(flaky, k)["count"] <= 3
    if counters.kind == "meshctl":
        assert counters.read()["flag_UT"] == 1


def test_a_per_try_timeout_is_not_retried_for_connect_failure_only(dataplane, flaky):
    policy = {"retry_on": "connect-failure", "per_try_timeout": "0.3s"}
    port, counters = started(dataplane, [flaky.port], route_action={"retry_policy": policy})
    k = key()
    response = get(port, f"/?key={k}&fail=1&how=hang&hang_ms=2000")
    assert response.status == 504
    assert upstream_stats(flaky, k)["count"] == 1
    assert counters.read()["upstream_rq_per_try_timeout"] == 1


@pytest.mark.parametrize("status", [409, 418])
def test_retriable_status_codes(dataplane, flaky, status):
    policy = {"retry_on": "retriable-status-codes", "retriable_status_codes": [409, 418]}
    port, _ = started(dataplane, [flaky.port], route_action={"retry_policy": policy})
    k = key()
    response = get(port, f"/?key={k}&fail=1&how={status}")
    assert response.status == 200
    assert upstream_stats(flaky, k)["count"] == 2
    # A status not listed is passed on.
    k = key()
    assert get(port, f"/?key={k}&fail=1&how=410").status == 410
    assert upstream_stats(flaky, k)["count"] == 1


def test_retriable_4xx_means_409(dataplane, flaky):
    port, _ = started(dataplane, [flaky.port], route_action={"retry_policy": {"retry_on": "retriable-4xx"}})
    k = key()
    assert get(port, f"/?key={k}&fail=1&how=409").status == 200
    k = key()
    assert get(port, f"/?key={k}&fail=1&how=404").status == 404


def test_resets_and_grpc_statuses(dataplane, flaky):
    port, _ = started(dataplane, [flaky.port], route_action={"retry_policy": {"retry_on": "reset,unavailable"}})
    k = key()
    assert get(port, f"/?key={k}&fail=1&how=reset").status == 200
    assert upstream_stats(flaky, k)["count"] == 2
    k = key()
    response = get(port, f"/?key={k}&fail=1&how=grpc-14")
    assert response.status == 200 and "grpc-status" not in response.headers
    assert upstream_stats(flaky, k)["count"] == 2
    k = key()
    assert get(port, f"/?key={k}&fail=1&how=grpc-13").headers.get("grpc-status") == "13"
    assert upstream_stats(flaky, k)["count"] == 1


def test_a_virtual_hosts_policy_applies_unless_the_route_has_its_own(dataplane, flaky):
    port, _ = started(
        dataplane,
        [flaky.port],
        virtual_host={
            "retry_policy": {"retry_on": "5xx"},
            "include_request_attempt_count": True,
            "include_attempt_count_in_response": True,
        },
    )
    k = key()
    response = get(port, f"/?key={k}&fail=1&how=503")
    assert response.status == 200
    assert response.headers.get("x-envoy-attempt-count") == "2"
    assert upstream_stats(flaky, k)["attempt_headers"] == ["1", "2"]
    port, _ = started(
        dataplane,
        [flaky.port],
        route_action={"retry_policy": {"retry_on": "connect-failure"}},
        virtual_host={"retry_policy": {"retry_on": "5xx"}},
    )
    k = key()
    assert get(port, f"/?key={k}&fail=1&how=503").status == 503, "the route's policy replaces the virtual host's"


def test_retry_headers_from_the_client_are_not_honoured_nor_forwarded(dataplane, flaky):
    port, _ = started(dataplane, [flaky.port])
    k = key()
    response = get(port, f"/?key={k}&fail=1&how=503", [("x-envoy-retry-on", "5xx"), ("x-envoy-max-retries", "3")])
    seen = upstream_stats(flaky, k)
    assert all(header is None for header in seen["retry_headers"]), "neither data plane forwards them"
    # meshctl never honours them; Envoy honours them only from clients it trusts (internal
    # addresses, with use_remote_address), which a loopback client here is not.
    assert (response.status, seen["count"]) == (503, 1)


def post(port: int, target: str, body: bytes) -> Response:
    client = Http1Client(port, timeout=20)
    try:
        return client.request("POST", target, [("content-type", "application/octet-stream")], body)
    finally:
        client.close()


def test_a_body_longer_than_the_buffer_is_sent_once(dataplane, flaky):
    # Envoy buffers for retries up to the listener's per_connection_buffer_limit_bytes (1 MiB by
    # default); meshctl up to 64 KiB unless the route says otherwise. The route states the same
    # 64 KiB for both data planes.
    action = {"retry_policy": {"retry_on": "5xx"}}
    port, counters = started(dataplane, [flaky.port], route_action=action, route={"per_request_buffer_limit_bytes": 65536})
    before = counters.read()
    small = bytes(range(256)) * 40  # 10 KiB
    k = key()
    response = post(port, f"/?key={k}&fail=1&how=503", small)
    assert response.status == 200
    seen = upstream_stats(flaky, k)
    assert seen["count"] == 2
    assert seen["bodies"][0] == seen["bodies"][1] == [len(small), response.json()["body_sha256"]]

    large = bytes(range(256)) * 400  # 100 KiB
    k = key()
    response = post(port, f"/?key={k}&fail=1&how=503", large)
    assert response.status == 503, "not retried"
    seen = upstream_stats(flaky, k)
    assert seen["count"] == 1
    assert seen["bodies"][0][0] == len(large)
    changed = increase(before, counters.read())
    assert changed.get("upstream_rq_retry") == 1, "only the small body was retried"
    assert changed.get("retry_skipped_body_too_large") == 1


def concurrently(port: int, targets: list[str], timeout: float = 20.0) -> list[tuple[int, bytes, float]]:
    def one(target: str) -> tuple[int, bytes, float]:
        began = time.monotonic()
        response = get(port, target, timeout=timeout)
        return response.status, response.body, time.monotonic() - began

    with ThreadPoolExecutor(len(targets)) as pool:
        return list(pool.map(one, targets))


def test_pending_requests_and_connections_overflow_at_once(dataplane, flaky):
    breakers = {"thresholds": [{"max_connections": 1, "max_pending_requests": 1}]}
    port, counters = started(dataplane, [flaky.port], cluster={"circuit_breakers": breakers})
    k = key()
    assert get(port, f"/?key={k}").status == 200  # one connection, idle in the pool
    before = counters.read()
    results = concurrently(port, [f"/?key={k}&delay_ms=1000"] * 6)
    ok = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 503]
    # One request takes the connection, one waits for it, the other four are refused at once.
    assert (len(ok), len(refused)) == (2, 4), [(s, b[:80], round(t, 2)) for s, b, t in results]
    assert all(took < 0.5 for _, _, took in refused), [round(t, 2) for _, _, t in refused]
    assert all(body == OVERFLOW_BODY for _, body, _ in refused)
    assert upstream_stats(flaky, k)["max_in_flight"] == 1
    changed = increase(before, settled(counters))
    assert changed.get("upstream_rq_pending_overflow") == 4
    assert changed.get("upstream_cx_overflow", 0) >= 1
    if counters.kind == "meshctl":
        assert changed.get("flag_UO") == 4


def test_max_requests_overflows_on_an_http2_cluster(dataplane, flaky):
    breakers = {"thresholds": [{"max_requests": 1}]}
    port, counters = started(dataplane, [flaky.port], cluster={"circuit_breakers": breakers}, http2=True)
    k = key()
    assert get(port, f"/?key={k}").status == 200  # the HTTP/2 connection is open
    before = counters.read()
    results = concurrently(port, [f"/?key={k}&delay_ms=1000"] * 5)
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [200, 503, 503, 503, 503], [(s, b[:80], round(t, 2)) for s, b, t in results]
    assert all(took < 0.5 for status, _, took in results if status == 503)
    assert upstream_stats(flaky, k)["max_in_flight"] == 1
    # Envoy 1.40 counts a request refused by max_requests as upstream_rq_active_overflow (its
    # documentation still says upstream_rq_pending_overflow).
    changed = increase(before, settled(counters))
    assert changed.get("upstream_rq_active_overflow") == 4
    assert "upstream_rq_pending_overflow" not in changed


@pytest.mark.parametrize("limit", ["max_retries", "retry_budget"])
def test_the_retry_breaker_bounds_retries_in_flight(dataplane, flaky, limit):
    thresholds = {"max_retries": 1} if limit == "max_retries" else {"retry_budget": {"budget_percent": {"value": 0}, "min_retry_concurrency": 1}}
    policy = {"retry_on": "5xx", "num_retries": 3, "retry_back_off": {"base_interval": "0.05s"}}
    port, counters = started(
        dataplane, [flaky.port], route_action={"retry_policy": policy}, cluster={"circuit_breakers": {"thresholds": [thresholds]}}
    )
    before = counters.read()
    k = key()
    results = concurrently(port, [f"/?key={k}&fail=1000&how=503&delay_ms=300"] * 8)
    assert [status for status, _, _ in results] == [503] * 8
    changed = increase(before, settled(counters))
    # Eight first tries fail together: one retry may go, seven are refused by the breaker. The one
    # that went may retry again (its slot is free once its try is done) up to num_retries.
    assert changed.get("upstream_rq_retry_overflow", 0) >= 5, changed
    assert 1 <= changed.get("upstream_rq_retry", 0) <= 3 + 8 - changed["upstream_rq_retry_overflow"], changed
    assert upstream_stats(flaky, k)["count"] == 8 + changed["upstream_rq_retry"]
    if counters.kind == "meshctl":
        assert changed.get("flag_UO", 0) == changed["upstream_rq_retry_overflow"]


def h2_post(port: int, target: str, body: bytes, trailers: list[tuple[str, str]]) -> tuple[int, bytes]:
    """One HTTP/2 (prior knowledge) POST with a body sent in pieces and trailers; (status, body)."""
    import socket

    import h2.config
    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        conn.initiate_connection()
        headers = [(":method", "POST"), (":path", target), (":scheme", "http"), (":authority", "proxy"), ("te", "trailers")]
        conn.send_headers(1, headers)
        sock.sendall(conn.data_to_send())
        for offset in range(0, len(body), 4096):
            conn.send_data(1, body[offset : offset + 4096])
            sock.sendall(conn.data_to_send())
        conn.send_headers(1, trailers, end_stream=True)
        sock.sendall(conn.data_to_send())
        status, received = 0, b""
        while True:
            data = sock.recv(65536)
            assert data, "the proxy closed the connection"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[":status"])
                elif isinstance(event, h2.events.DataReceived):
                    received += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, 1)
                elif isinstance(event, h2.events.StreamEnded):
                    return status, received
                elif isinstance(event, h2.events.StreamReset):
                    raise AssertionError(f"stream reset: {event.error_code}")
            sock.sendall(conn.data_to_send())


def test_an_http2_body_with_trailers_is_replayed_to_an_http2_upstream(dataplane, flaky):
    policy = {"retry_on": "5xx", "num_retries": 2}
    port, _ = started(dataplane, [flaky.port], route_action={"retry_policy": policy}, http2=True)
    body = bytes(range(256)) * 120  # 30 KiB, sent as eight DATA frames
    k = key()
    status, answer = h2_post(port, f"/?key={k}&fail=2&how=503", body, [("x-checksum", "abc")])
    assert status == 200
    seen = upstream_stats(flaky, k)
    assert seen["count"] == 3
    assert len({tuple(b) for b in seen["bodies"]}) == 1
    assert seen["bodies"][0][0] == len(body)
    assert json.loads(answer)["body_sha256"] == seen["bodies"][0][1]


def test_connect_failures_past_the_retry_limit(dataplane, flaky):
    dead = free_port()
    policy = {"retry_on": "connect-failure", "num_retries": 2, "retry_back_off": {"base_interval": "0.001s"}}
    port, counters = started(dataplane, [dead], route_action={"retry_policy": policy})
    before = counters.read()
    response = get(port, "/")
    assert response.status == 503
    # Both say the request was retried, then why the last try failed.
    assert response.body.startswith(b"upstream connect error or disconnect/reset before headers. retried and the latest reset reason:")
    changed = increase(before, settled(counters))
    assert changed.get("upstream_rq_retry") == 2
    assert changed.get("upstream_rq_retry_limit_exceeded") == 1
    if counters.kind == "meshctl":
        assert changed.get("flag_UF") == 1 and changed.get("flag_URX") == 1


@pytest.mark.meshctl_only
def test_no_route_is_counted_as_flag_nr(meshctl_dataplane, flaky):
    port, admin = free_port(), free_port()
    config = proxy(port, admin, [flaky.port])
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["route_config"]["virtual_hosts"][0]["routes"][0]["match"] = {"prefix": "/only"}
    meshctl_dataplane(config)
    assert get(port, "/elsewhere").status == 404
    text = Counters("meshctl", admin)._get("/stats/prometheus")
    assert 'meshctl_downstream_rq_response_flags_total{listener="http",flag="NR"} 1' in text


def test_a_request_waiting_for_a_connection_is_bounded_by_the_route_timeout(dataplane, flaky):
    breakers = {"thresholds": [{"max_connections": 1, "max_pending_requests": 1}]}
    port, counters = started(dataplane, [flaky.port], route_action={"timeout": "0.5s"}, cluster={"circuit_breakers": breakers})
    k = key()
    assert get(port, f"/?key={k}").status == 200
    results = concurrently(port, [f"/?key={k}&delay_ms=400", f"/?key={k}&delay_ms=400"])
    # One holds the only connection for 0.4 s; the other waits for it and then has 0.1 s left.
    assert sorted(status for status, _, _ in results) == [200, 504], results
    after = settled(counters)
    assert after["upstream_rq_pending_active"] == 0
    # The connection is still there and serves the next request at once.
    began = time.monotonic()
    assert get(port, f"/?key={k}").status == 200
    assert time.monotonic() - began < 0.3


def http_options(common: dict, http2: bool) -> dict:
    protocol = {"http2_protocol_options": {}} if http2 else {"http_protocol_options": {}}
    return {
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": b.HTTP_PROTOCOL_OPTIONS_TYPE,
                "explicit_http_config": protocol,
                "common_http_protocol_options": common,
            }
        }
    }


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
def test_max_requests_per_connection_and_idle_timeout(dataplane, flaky, http2):
    port, counters = started(dataplane, [flaky.port], cluster=http_options({"max_requests_per_connection": 2}, http2))
    before = counters.read()
    client = Http1Client(port)
    assert [client.get(f"/?key={key()}").status for _ in range(6)] == [200] * 6
    client.close()
    assert increase(before, counters.read())["upstream_cx_total"] == 3, "two requests per connection"

    port, counters = started(dataplane, [flaky.port], cluster=http_options({"idle_timeout": "1s"}, http2))
    before = counters.read()
    client = Http1Client(port)
    assert client.get(f"/?key={key()}").status == 200
    assert client.get(f"/?key={key()}").status == 200
    time.sleep(2.5)
    assert client.get(f"/?key={key()}").status == 200
    client.close()
    assert increase(before, counters.read())["upstream_cx_total"] == 2, "the idle connection was closed, a new one opened"
