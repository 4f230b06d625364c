"""curl through the sidecar over HTTP/1.1 and h2c (prior knowledge), to HTTP/1.1 and h2c upstreams."""

from __future__ import annotations

import json
import subprocess

import pytest

from helpers.bootstrap import simple_proxy


def curl(*args: str) -> tuple[int, dict[str, str], bytes, str]:
    """Run curl; return (status, response headers, body, protocol version)."""
    completed = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "-D", "-", "-o", "-", *args],
        capture_output=True,
        timeout=20,
    )
    assert completed.returncode == 0, completed.stderr.decode()
    head, _, body = completed.stdout.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    protocol, status = lines[0].split()[:2]
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status), headers, body, protocol


@pytest.mark.parametrize("upstream_http2", [False, True], ids=["upstream-h1", "upstream-h2c"])
@pytest.mark.parametrize("downstream", ["http1.1", "h2c"])
def test_curl_through_sidecar(dataplane, port, echo_a, downstream, upstream_http2):
    dataplane(simple_proxy(port, echo_a.port, http2_upstream=upstream_http2))
    flag = "--http1.1" if downstream == "http1.1" else "--http2-prior-knowledge"

    status, headers, body, protocol = curl(flag, f"http://127.0.0.1:{port}/hello/world?x=1&y=two")
    assert status == 200
    assert protocol == ("HTTP/1.1" if downstream == "http1.1" else "HTTP/2")
    echoed = json.loads(body)
    assert echoed["name"] == "a"
    assert (echoed["method"], echoed["path"], echoed["query"]) == ("GET", "/hello/world", "x=1&y=two")
    assert echoed["headers"]["user-agent"].startswith("curl/")
    assert headers["x-upstream"] == "a"

    # A request body and a non-2xx upstream status come back unchanged.
    payload = "name=value&" + "z" * 5000
    status, _, body, _ = curl(flag, "--data-binary", payload, f"http://127.0.0.1:{port}/submit?status=201")
    assert status == 201
    echoed = json.loads(body)
    assert (echoed["method"], echoed["body"]) == ("POST", payload)
