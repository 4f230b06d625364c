"""STRICT mTLS on the wire: a capture of the sidecar-to-sidecar port holds none of the payload, and a plaintext client is refused."""

from __future__ import annotations

import http.client
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from helpers import pki
from helpers.counting_app import BODY, CountingApp
from helpers.dataplane import start_dataplane
from helpers.mtls_bootstrap import MeshUpstream, TlsFiles, client_sidecar, server_sidecar
from helpers.ports import free_port

CLIENT_ID, SERVER_ID = pki.spiffe_id("client"), pki.spiffe_id("server")
MARKER = "payload-that-must-never-be-seen-4f1c"
TLS_APPLICATION_DATA = b"\x17\x03\x03"  # a TLS record header (content type 23, legacy version 1.2)

pytestmark = pytest.mark.skipif(shutil.which("tcpdump") is None, reason="tcpdump not installed")


class Capture:
    """tcpdump on loopback for one TCP port, written to a pcap file; stopped by its own PID."""

    def __init__(self, port: int, path: Path) -> None:
        self.path = path
        self.process = subprocess.Popen(
            # -Z root: with the default drop to user tcpdump, filtered packets were counted but
            # never written on this kernel. --immediate-mode: no buffering before -w.
            ["tcpdump", "-i", "lo", "-Z", "root", "--immediate-mode", "-U", "-s", "0"]
            + ["-w", str(path), f"tcp port {port}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        # tcpdump says "listening on lo" once the capture is armed; traffic before that is lost.
        line = self.process.stderr.readline().decode(errors="replace")
        if "listening on" not in line:
            self.process.kill()
            raise RuntimeError(f"tcpdump did not start: {line}")

    def stop(self) -> bytes:
        time.sleep(0.3)  # let the last packets reach the file (-U flushes per packet)
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(10)
        self.process.stderr.close()
        return self.path.read_bytes()


@pytest.fixture
def dataplanes(dataplane_kind: str, tmp_path: Path):
    """Like conftest's `dataplane`, but each sidecar in its own directory (own bootstrap and log)."""
    started = []

    def start(config: dict, name: str):
        directory = tmp_path / name
        directory.mkdir()
        started.append(start_dataplane(dataplane_kind, config, directory))

    yield start
    for process in started:
        process.stop()
        print(f"--- {process.name} ({process.log_path}) ---\n{process.log()}")


def mesh_pair(dataplane, tmp_path: Path, app: CountingApp) -> tuple[int, int]:
    """A client sidecar (plain listener) → mTLS h2 → a STRICT server sidecar → `app`."""
    root = pki.CertificateAuthority.root()
    trust = pki.write_trust(tmp_path, [root], [root])
    files = {}
    for role, identity in (("client", CLIENT_ID), ("server", SERVER_ID)):
        cert, key = root.workload(identity).write(tmp_path, role)
        files[role] = TlsFiles(cert, key, trust.ca, trust.crl)
    inbound, outbound = free_port(), free_port()
    prefix = [{"prefix": "spiffe://cluster.local/"}]
    dataplane(server_sidecar(inbound, app.port, files["server"], san_matchers=prefix), "server")
    upstream = MeshUpstream("server", "/", inbound, SERVER_ID)
    dataplane(client_sidecar(outbound, [upstream], files["client"]), "client")
    return outbound, inbound


@pytest.fixture
def app():
    running = CountingApp()
    yield running
    running.stop()


def test_capture_between_sidecars_holds_no_payload(dataplanes, tmp_path, app):
    outbound, inbound = mesh_pair(dataplanes, tmp_path, app)
    capture = Capture(inbound, tmp_path / "mesh.pcap")
    # Control: the client's plaintext hop to sidecar A, captured the same way, does show the payload.
    control = Capture(outbound, tmp_path / "plaintext.pcap")
    try:
        for index in range(20):
            connection = http.client.HTTPConnection("127.0.0.1", outbound, timeout=10)
            body = f"{MARKER}-body-{index}".encode()
            connection.request(
                "POST", f"/{MARKER}/path", body=body, headers={"x-secret": MARKER, "host": "server"}
            )
            response = connection.getresponse()
            assert (response.status, response.read()) == (200, BODY)
            connection.close()
    finally:
        wire, plaintext = capture.stop(), control.stop()
    assert MARKER.encode() in plaintext and BODY.strip() in plaintext
    assert app.wait_quiet().requests == 20
    # The capture did see the mesh traffic (TLS records), and none of it in the clear.
    assert wire.count(TLS_APPLICATION_DATA) >= 20, f"only {len(wire)} bytes captured"
    for secret in (MARKER.encode(), BODY.strip(), b"x-secret", b"HTTP/1.1", b"PRI * HTTP/2.0"):
        assert secret not in wire, f"{secret!r} crossed the mesh port in the clear"


def test_plaintext_client_is_refused_by_a_strict_sidecar(dataplanes, tmp_path, app):
    _, inbound = mesh_pair(dataplanes, tmp_path, app)
    before = app.wait_quiet()
    for request in (
        b"GET / HTTP/1.1\r\nhost: server\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",  # h2c prior knowledge
    ):
        with socket.create_connection(("127.0.0.1", inbound), timeout=5) as sock:
            try:
                sock.sendall(request)
                answer = sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                answer = b""
        # No filter chain matches plaintext: the connection is closed without any HTTP answer.
        assert answer == b"", answer[:200]
    after = app.wait_quiet()
    assert (after.bytes, after.connections) == (before.bytes, before.connections)
