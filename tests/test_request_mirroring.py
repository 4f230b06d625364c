"""VirtualService mirroring end to end, on both data planes, as Istio's mirroring task: v1 gets
the traffic, v2 gets copies with "-shadow" after their host, the client only ever sees v1's
answers; mirrorPercentage mirrors about that share. The upstreams (tests/servers/retry_upstream.py)
count what each key received and the Host it came with."""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from meshctl.control.compiler import compile_mesh, sidecar_resources
from meshctl.control.registry import Sidecar

from helpers.compiled_mesh import compiled_bootstrap
from helpers.http_client import Http1Client
from helpers.ports import free_port
from helpers.procs import Process, start_upstream

HTTPBIN = "httpbin.default.svc.cluster.local"
V1, V2 = (f"outbound|8000|{subset}|{HTTPBIN}" for subset in ("v1", "v2"))
CLIENT = Sidecar(node_id="sleep", service="sleep", outbound_port=16001)
REGISTRY = [
    Sidecar(node_id=f"httpbin-{v}", service="httpbin", version=v, service_port=8000, app_port=port,
            inbound_port=port + 1000, ready=True)  # fmt: skip
    for v, port in (("v1", 8101), ("v2", 8102))
] + [CLIENT]
DESTINATION_RULE = {
    "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
    "metadata": {"name": "httpbin", "namespace": "default"},
    "spec": {"host": "httpbin", "subsets": [{"name": "v1", "labels": {"version": "v1"}},
                                             {"name": "v2", "labels": {"version": "v2"}}]},
}  # fmt: skip


def mirroring_task(**mirror_percentage) -> dict:
    """The task's VirtualService: all traffic to v1, mirrored to v2."""
    return {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": "httpbin", "namespace": "default"},
            "spec": {"hosts": ["httpbin"], "http": [{
                "route": [{"destination": {"host": "httpbin", "subset": "v1"}, "weight": 100}],
                "mirror": {"host": "httpbin", "subset": "v2"}, **mirror_percentage}]}}  # fmt: skip


@pytest.fixture(scope="module")
def versions(upstream_logs: Path):
    started = [start_upstream("retry_upstream.py", upstream_logs) for _ in range(2)]
    yield started
    for process in started:
        process.stop()


def received(upstream: Process, key: str) -> dict:
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
        f"http://127.0.0.1:{upstream.port}/__stats?key={key}", timeout=5
    ) as response:
        return json.loads(response.read())


def serve(dataplane, virtual_service: dict, v1_port: int, v2_port: int) -> tuple[int, int, str]:
    resources = sidecar_resources(compile_mesh([DESTINATION_RULE, virtual_service], REGISTRY), CLIENT)
    port, admin = free_port(), free_port()
    process = dataplane(compiled_bootstrap(resources, port, admin, {V1: v1_port, V2: v2_port}))
    return port, admin, process.name


def send(port: int, key: str, count: int, method: str = "GET", body: bytes = b"") -> list[dict]:
    client = Http1Client(port, timeout=20)
    try:
        answers = []
        for _ in range(count):
            response = client.request(method, f"/headers?key={key}", [("host", "httpbin:8000")], body)
            assert response.status == 200, response.body
            answers.append(response.json())
        return answers
    finally:
        client.close()


def eventually(read, expected: int, timeout: float = 10.0) -> dict:
    """The copies are fire-and-forget: wait until `expected` arrived (or time runs out)."""
    deadline = time.monotonic() + timeout
    while True:
        seen = read()
        if seen["count"] >= expected or time.monotonic() > deadline:
            return seen
        time.sleep(0.05)


def test_istios_mirroring_task_copies_every_request_to_v2(dataplane, versions):
    v1, v2 = versions
    port, _, _ = serve(dataplane, mirroring_task(), v1.port, v2.port)
    key = uuid.uuid4().hex[:12]
    answers = send(port, key, 20)
    # The client sees v1's answers only: v1 counted each request once, in order.
    assert [a["attempt"] for a in answers] == list(range(1, 21))
    assert received(v1, key)["count"] == 20
    assert set(received(v1, key)["hosts"]) == {"httpbin:8000"}
    mirrored = eventually(lambda: received(v2, key), 20)
    assert mirrored["count"] == 20
    assert set(mirrored["hosts"]) == {"httpbin-shadow:8000"}


def test_mirror_percentage_fifty_mirrors_about_half(dataplane, versions):
    v1, v2 = versions
    port, _, _ = serve(dataplane, mirroring_task(mirrorPercentage={"value": 50.0}), v1.port, v2.port)
    key = uuid.uuid4().hex[:12]
    send(port, key, 200)
    assert received(v1, key)["count"] == 200
    time.sleep(1.0)  # the last copies may still be on their way
    copies = received(v2, key)["count"]
    # Binomial(200, 0.5): mean 100, standard deviation ~7.1; this bound is ~5.6 deviations wide.
    assert 60 <= copies <= 140, copies


def test_a_mirror_that_never_answers_never_delays_the_request(dataplane, versions):
    v1, _ = versions
    # v2 accepts connections and never answers.
    silent = socket.create_server(("127.0.0.1", 0), backlog=128)
    try:
        port, _, _ = serve(dataplane, mirroring_task(), v1.port, silent.getsockname()[1])
        key = uuid.uuid4().hex[:12]
        started = time.monotonic()
        answers = send(port, key, 20)
        took = time.monotonic() - started
        assert [a["attempt"] for a in answers] == list(range(1, 21))
        assert took < 5.0, f"20 requests took {took:.2f}s with a silent mirror"
    finally:
        silent.close()


def test_a_request_body_is_mirrored_too(dataplane, versions):
    v1, v2 = versions
    port, _, _ = serve(dataplane, mirroring_task(), v1.port, v2.port)
    key = uuid.uuid4().hex[:12]
    body = bytes(range(256)) * 64  # 16 KiB
    send(port, key, 3, method="POST", body=body)
    assert received(v1, key)["count"] == 3
    mirrored = eventually(lambda: received(v2, key), 3)
    assert mirrored["count"] == 3
    assert mirrored["bodies"] == received(v1, key)["bodies"]
    assert mirrored["bodies"][0][0] == len(body)


def test_a_body_beyond_the_buffer_limit_is_streamed_by_envoy_and_not_mirrored_by_meshctl(dataplane, versions):
    v1, v2 = versions
    port, admin, kind = serve(dataplane, mirroring_task(), v1.port, v2.port)
    key = uuid.uuid4().hex[:12]
    # Beyond meshctl's limit (the route's buffer limit, 64 KiB by default); Envoy 1.40 streams
    # its copies, so it mirrors a body of any length.
    body = b"x" * (2 * 1024 * 1024)
    send(port, key, 1, method="POST", body=body)
    assert received(v1, key)["count"] == 1
    if kind == "envoy":
        mirrored = eventually(lambda: received(v2, key), 1)
        assert mirrored["bodies"] == received(v1, key)["bodies"]
        return
    time.sleep(0.5)
    assert received(v2, key)["count"] == 0
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{admin}/stats/prometheus", timeout=5) as response:
        text = response.read().decode()
    series = f'meshctl_retry_or_shadow_abandoned_total{{cluster="{V2}"}}'
    assert re.search(rf"^{re.escape(series)} 1$", text, re.MULTILINE), text


def test_a_chunked_request_body_is_mirrored_whole(dataplane, versions):
    v1, v2 = versions
    port, _, _ = serve(dataplane, mirroring_task(), v1.port, v2.port)
    key = uuid.uuid4().hex[:12]
    chunks = [b"first,", b"second,", b"third"]
    head = f"POST /?key={key} HTTP/1.1\r\nhost: httpbin:8000\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    payload = head.encode() + b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(payload)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    mirrored = eventually(lambda: received(v2, key), 1)
    assert mirrored["bodies"] == received(v1, key)["bodies"]
    assert mirrored["bodies"][0][0] == len(b"".join(chunks))
