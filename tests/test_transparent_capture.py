"""Transparent capture: iptables REDIRECT in a network namespace the test creates sends an app's
outbound connections to the sidecar, which recovers each one's original destination
(SO_ORIGINAL_DST), hands it to the listener for that address, and forwards it there."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import bootstrap as b
from helpers.dataplane import dataplane_command, write_bootstrap

SERVERS = Path(__file__).parent / "servers"
CAPTURE_PORT, APP_PORT, LINE_PORT = 15001, 9080, 9090
NOBODY = 65534

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("iptables") or not shutil.which("ip"),
    reason="needs root, iptables and iproute2 (scripts/test.sh installs them)",
)


def capture_bootstrap() -> dict:
    passthrough = {"name": "passthrough", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED", "connect_timeout": "1s"}
    routes = b.route_configuration(
        "app",
        [b.virtual_host("all", [b.route("passthrough")])],
        response_headers_to_add=[{"header": {"key": "x-captured-by", "value": "sidecar"}}],
    )
    capture = b.listener(
        "virtual_outbound",
        CAPTURE_PORT,
        [{"filters": [b.tcp_proxy("passthrough")]}],
        use_original_dst=True,
    )
    capture["address"]["socket_address"]["address"] = "0.0.0.0"
    app = b.http_listener("outbound_app", APP_PORT, routes)
    app["address"]["socket_address"]["address"] = "0.0.0.0"
    app["bind_to_port"] = False
    return b.bootstrap([capture, app], [passthrough])


class Namespace:
    """A network namespace with loopback up; every process started in it is stopped by PID."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.processes: list[subprocess.Popen] = []
        subprocess.run(["ip", "netns", "add", name], check=True)
        self.run(["ip", "link", "set", "lo", "up"])

    def command(self, argv: list[str], uid: int | None = None) -> list[str]:
        prefix = ["ip", "netns", "exec", self.name]
        if uid is not None:
            prefix += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        return prefix + argv

    def run(self, argv: list[str], uid: int | None = None, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(argv, uid), check=True, capture_output=True, text=True, timeout=30, **kwargs)

    def start(self, argv: list[str], log: Path) -> subprocess.Popen:
        handle = log.open("w")
        process = subprocess.Popen(self.command(argv), stdout=handle, stderr=subprocess.STDOUT)
        self.processes.append(process)
        return process

    def wait_for_port(self, port: int, timeout: float = 20.0) -> None:
        probe = f"import socket; socket.create_connection(('127.0.0.1', {port}), 0.5).close()"
        deadline = time.monotonic() + timeout
        while subprocess.run(self.command([sys.executable, "-c", probe]), capture_output=True).returncode != 0:
            assert time.monotonic() < deadline, f"nothing listens on {port} in {self.name}"
            time.sleep(0.1)

    def close(self) -> None:
        for process in self.processes:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        subprocess.run(["ip", "netns", "delete", self.name], check=False)


@pytest.fixture
def namespace(dataplane_kind):
    created = Namespace(f"meshctl-capture-{os.getpid()}-{dataplane_kind}")
    yield created
    created.close()


def test_outbound_traffic_is_captured_and_sent_to_its_original_destination(namespace, dataplane_kind, tmp_path):
    namespace.start([sys.executable, str(SERVERS / "http_echo.py"), "--name", "app", "--port", str(APP_PORT)], tmp_path / "app.log")
    namespace.start([sys.executable, str(SERVERS / "line_server.py"), "--name", "lines", "--port", str(LINE_PORT)], tmp_path / "lines.log")
    bootstrap_path = write_bootstrap(capture_bootstrap(), tmp_path)
    namespace.start(dataplane_command(dataplane_kind, bootstrap_path), tmp_path / "dataplane.log")
    for port in (APP_PORT, LINE_PORT, CAPTURE_PORT):
        namespace.wait_for_port(port)
    # Only the app's user is captured, so the sidecar's own upstream connections are not.
    namespace.run(
        ["iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-m", "owner", "--uid-owner", str(NOBODY),
         "-j", "REDIRECT", "--to-ports", str(CAPTURE_PORT)]
    )

    curl = ["curl", "-sS", "-i", "--max-time", "10", f"http://127.0.0.1:{APP_PORT}/hello"]
    captured = namespace.run(curl, uid=NOBODY).stdout
    # text mode turned CRLF into LF.
    head, _, body = captured.partition("\n\n")
    assert head.startswith("HTTP/1.1 200"), captured
    assert "x-captured-by: sidecar" in head.lower(), head
    assert (json.loads(body)["name"], json.loads(body)["path"]) == ("app", "/hello")

    # Traffic from other users is left alone.
    direct_head = namespace.run(curl).stdout.partition("\n\n")[0]
    assert "x-captured-by" not in direct_head.lower(), direct_head

    # A port with no listener of its own is passed through as TCP to where it was going.
    read_greeting = (
        "import socket; s = socket.create_connection(('127.0.0.1', %d), 10); "
        "print(s.makefile('rb').readline().decode().strip())" % LINE_PORT
    )
    greeting = namespace.run([sys.executable, "-c", read_greeting], uid=NOBODY).stdout.strip()
    assert greeting == "HELLO lines"
