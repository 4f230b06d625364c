"""HTTP/1.1 corpus: raw requests on a real socket to each data plane, answered as Envoy answers them.

Each case is one request as bytes, the status it must get, whether the data plane then closes the
connection, whether it may reach the upstream, and whether it is the client's protocol error
(counted as Envoy's downstream_cx_protocol_error; on meshctl the series
meshctl_downstream_cx_protocol_error_total). A client's error must never be counted against the
upstream: no 5xx and no connect failure on its cluster, so `meshctl route shift` does not blame a
version for it.
"""

from __future__ import annotations

import re
import socket
import time
import urllib.request
from dataclasses import dataclass

import pytest

from helpers import bootstrap as b
from helpers.ports import free_port
from helpers.procs import Process, start_upstream

CHUNKED_HEAD = b"POST /upload HTTP/1.1\r\nhost: svc.test\r\ntransfer-encoding: chunked\r\n\r\n"


@dataclass(frozen=True)
class Case:
    id: str
    request: bytes
    status: int
    closes: bool
    # The request heads the upstream must log for this case ([]: it must not see the request);
    # None: not checked (a malformed body may be refused after its head went upstream, as on Envoy,
    # which then resets that upstream request).
    upstream_sees: list[str] | None
    protocol_error: bool = False
    body_contains: bytes = b""


CASES = [
    Case(
        "connect-without-connect-route",
        b"CONNECT svc.test:80 HTTP/1.1\r\nhost: svc.test:80\r\n\r\n",
        # Envoy: path matchers never match a CONNECT (it has no path); only connect_matcher does.
        status=404,
        closes=True,
        upstream_sees=[],
    ),
    Case(
        "connect-authority-only",
        b"CONNECT svc.test:80 HTTP/1.1\r\n\r\n",
        status=404,
        closes=True,
        upstream_sees=[],
    ),
    Case(
        "chunk-size-not-hex",
        CHUNKED_HEAD + b"zz\r\nhello\r\n0\r\n\r\n",
        status=400,
        closes=True,
        upstream_sees=None,
        protocol_error=True,
    ),
    Case(
        "chunk-size-overflows-u64",
        CHUNKED_HEAD + b"ffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
        status=400,
        closes=True,
        upstream_sees=None,
        protocol_error=True,
    ),
    Case(
        # The head (and a good chunk) may be on its way upstream when the bad chunk size arrives.
        "bad-chunk-size-after-a-good-chunk",
        CHUNKED_HEAD + b"5\r\nhello\r\nzz\r\n",
        status=400,
        closes=True,
        upstream_sees=None,
        protocol_error=True,
    ),
    Case(
        "well-formed-chunked-body",
        CHUNKED_HEAD + b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        status=200,
        closes=False,
        upstream_sees=["request POST /upload"],
        body_contains=b'"body": "hello world"',
    ),
]


@pytest.fixture(scope="module")
def recording_echo(upstream_logs):
    """echo_a's server, named "a" too, that also logs every request head it receives."""
    process = start_upstream("http_echo.py", upstream_logs, "--name", "a", "--log-requests")
    yield process
    process.stop()


def upstream_requests(upstream: Process) -> list[str]:
    return [line for line in upstream.log_path.read_text(errors="replace").splitlines() if line.startswith("request ")]


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    closed: bool


def exchange(port: int, payload: bytes, timeout: float = 5.0) -> Answer:
    """Send raw bytes, read one response (content-length framed), then see whether the peer closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(payload)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed before a response head; got {received!r}"
            received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed mid-body; got {body!r}"
            body += chunk
        # A data plane that keeps the connection open lets this wait run out.
        sock.settimeout(2.0)
        try:
            closed = sock.recv(1) == b""
        except TimeoutError:
            closed = False
        except ConnectionResetError:
            closed = True
        return Answer(status, headers, body, closed)


class Counters:
    """The counters this corpus asserts on, read from the data plane's admin port."""

    def __init__(self, kind: str, admin_port: int):
        self.kind = kind
        self.admin_port = admin_port

    def read(self) -> dict[str, int]:
        if self.kind == "meshctl":
            text = self._get("/stats/prometheus")
            return {
                "protocol_errors": _series(text, 'meshctl_downstream_cx_protocol_error_total{listener="http"}'),
                "upstream_5xx": _series(text, 'meshctl_upstream_rs_total{cluster="upstream",code_class="5xx"}'),
                "connect_failures": _series(text, 'meshctl_upstream_cx_connect_fail_total{cluster="upstream"}'),
            }
        stats = {}
        for line in self._get("/stats").splitlines():
            name, _, value = line.partition(": ")
            if value.isdigit():
                stats[name] = int(value)
        return {
            "protocol_errors": stats.get("http.ingress_http.downstream_cx_protocol_error", 0),
            "upstream_5xx": stats.get("cluster.upstream.upstream_rq_5xx", 0),
            "connect_failures": stats.get("cluster.upstream.upstream_cx_connect_fail", 0),
        }

    def _get(self, path: str) -> str:
        # No proxy from the environment may catch a loopback read.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5) as response:
            return response.read().decode()


def _series(text: str, series: str) -> int:
    found = re.search(rf"^{re.escape(series)} (\d+)$", text, re.MULTILINE)
    assert found, f"{series} is missing from /stats/prometheus"
    return int(found.group(1))


def proxy_with_admin(listener_port: int, upstream_port: int, admin_port: int) -> b.Json:
    config = b.simple_proxy(listener_port, upstream_port)
    config["admin"] = {"address": b.socket_address(admin_port)}
    return config


def requests_up_to(upstream: Process, start: int, marker: str, timeout: float = 5.0) -> list[str]:
    """The request heads the upstream logged from index `start` until `marker`, which it must log."""
    deadline = time.monotonic() + timeout
    while True:
        lines = upstream_requests(upstream)[start:]
        if marker in lines:
            return lines[: lines.index(marker)]
        assert time.monotonic() < deadline, f"the upstream never logged {marker!r}; it logged {lines}"
        time.sleep(0.05)


def counters_after(counters: Counters, before: dict[str, int], protocol_errors: int, timeout: float = 5.0) -> dict[str, int]:
    """The counters once the protocol-error count has reached before + `protocol_errors` (or the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        now = counters.read()
        if now["protocol_errors"] >= before["protocol_errors"] + protocol_errors or time.monotonic() > deadline:
            return now
        time.sleep(0.05)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_http1_corpus(case: Case, dataplane, dataplane_kind, recording_echo, port):
    admin_port = free_port()
    dataplane(proxy_with_admin(port, recording_echo.port, admin_port), wait_ports=[port, admin_port])
    counters = Counters(dataplane_kind, admin_port)
    before = counters.read()
    seen_before = len(upstream_requests(recording_echo))

    answer = exchange(port, case.request)

    assert answer.status == case.status, f"{dataplane_kind}: {answer}"
    assert answer.closed == case.closes, f"{dataplane_kind} {'closed' if answer.closed else 'kept'} the connection: {answer}"
    if case.closes:
        assert answer.headers.get("connection", "").lower() == "close", answer
    assert case.body_contains in answer.body, answer

    # A marker request after the case: once the upstream has logged it, anything the case sent
    # upstream has been logged too.
    marker = f"/marker-after-{case.id}"
    assert exchange(port, f"GET {marker} HTTP/1.1\r\nhost: svc.test\r\n\r\n".encode()).status == 200
    seen = requests_up_to(recording_echo, seen_before, f"request GET {marker}")
    if case.upstream_sees is not None:
        assert seen == case.upstream_sees, f"{dataplane_kind}: the upstream saw {seen}, expected {case.upstream_sees}"

    after = counters_after(counters, before, int(case.protocol_error))
    assert after["protocol_errors"] - before["protocol_errors"] == int(case.protocol_error), (before, after)
    assert after["upstream_5xx"] == before["upstream_5xx"], f"a client's error was counted against the upstream: {before} → {after}"
    assert after["connect_failures"] == before["connect_failures"], f"counted as a connect failure: {before} → {after}"
