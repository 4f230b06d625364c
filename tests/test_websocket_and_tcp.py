"""WebSocket upgrade through the HTTP chain, and protocol sniffing: opaque TCP and HTTP on one port."""

from __future__ import annotations

import json
import socket
import subprocess
import time

from websockets.sync.client import connect as websocket_connect

from helpers.bootstrap import (
    HTTP_INSPECTOR_TYPE,
    TLS_INSPECTOR_TYPE,
    bootstrap,
    cluster,
    http_connection_manager,
    listener,
    route,
    route_configuration,
    simple_proxy,
    tcp_proxy,
    virtual_host,
)
from helpers.http_client import Http1Client

SNIFF_TIMEOUT = 0.3


def test_websocket_echo(dataplane, port, ws_upstream):
    dataplane(simple_proxy(port, ws_upstream.port, websocket=True))
    with websocket_connect(f"ws://127.0.0.1:{port}/chat", open_timeout=10, close_timeout=5) as ws:
        ws.send("hello")
        assert ws.recv(timeout=10) == "hello"
        blob = bytes(range(256)) * 400  # ~100 KB, several frames and TCP segments
        ws.send(blob)
        assert ws.recv(timeout=10) == blob
        for index in range(20):
            ws.send(f"message {index}")
        assert [ws.recv(timeout=10) for _ in range(20)] == [f"message {index}" for index in range(20)]


def sniffing_bootstrap(port: int, http_port: int, line_port: int) -> dict:
    """HTTP (h1/h2c) goes to the HCM chain; anything else falls through to tcp_proxy."""
    routes = route_configuration("local", [virtual_host("all", [route("http")])])
    mixed = listener(
        "mixed",
        port,
        [
            {
                "filter_chain_match": {"application_protocols": ["http/1.1", "h2c"]},
                "filters": [http_connection_manager(routes)],
            }
        ],
        listener_filters=[
            {"name": "envoy.filters.listener.http_inspector", "typed_config": {"@type": HTTP_INSPECTOR_TYPE}},
            {"name": "envoy.filters.listener.tls_inspector", "typed_config": {"@type": TLS_INSPECTOR_TYPE}},
        ],
        listener_filters_timeout=f"{SNIFF_TIMEOUT}s",
        continue_on_listener_filters_timeout=True,
        default_filter_chain={"filters": [tcp_proxy("lines")]},
    )
    return bootstrap([mixed], [cluster("http", http_port), cluster("lines", line_port)])


def test_server_speaks_first_and_http_share_a_port(dataplane, port, echo_a, line_upstream):
    dataplane(sniffing_bootstrap(port, echo_a.port, line_upstream.port))

    # Silent client: the sniffers time out, the default chain (tcp_proxy) takes over and the
    # upstream's greeting reaches us.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, sock.makefile("rb") as lines:
        started = time.monotonic()
        assert lines.readline() == b"HELLO lines\n"
        waited = time.monotonic() - started
        assert waited < SNIFF_TIMEOUT + 2.0, f"greeting took {waited:.2f}s"
        for text in (b"first", b"second line", b"x" * 3000):
            sock.sendall(text + b"\n")
            assert lines.readline() == b"ECHO " + text + b"\n"

    # HTTP/1.1 on the same port goes to the HTTP chain.
    client = Http1Client(port)
    response = client.get("/via-http?k=v")
    client.close()
    assert response.status == 200
    assert (response.json()["name"], response.json()["path"]) == ("a", "/via-http")

    # h2c prior knowledge too.
    completed = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "--http2-prior-knowledge", f"http://127.0.0.1:{port}/via-h2c"],
        capture_output=True, timeout=20,
    )
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout)["path"] == "/via-h2c"

    # A client that speaks first with a non-HTTP line is proxied as TCP right away.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, sock.makefile("rb") as lines:
        sock.sendall(b"not http at all\n")
        assert lines.readline() == b"HELLO lines\n"
        assert lines.readline() == b"ECHO not http at all\n"
