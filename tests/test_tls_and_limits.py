"""TLS termination (HTTP/1.1 and HTTP/2 by ALPN) and the limits that protect the sidecar, on both data planes."""

from __future__ import annotations

import datetime
import json
import socket
import subprocess
import time
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from helpers import bootstrap as b
from helpers.ports import free_port

DOWNSTREAM_TLS_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"


def write_self_signed(directory: Path, host: str = "proxy.test") -> tuple[Path, Path]:
    """A self-signed server certificate for `host` (also the CA the client trusts)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "server.crt", directory / "server.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def tls_proxy(port: int, upstream_port: int, cert: Path, key: Path) -> dict:
    routes = b.route_configuration("local", [b.virtual_host("all", [b.route("upstream")])])
    chain = {
        "filters": [b.http_connection_manager(routes)],
        "transport_socket": {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": DOWNSTREAM_TLS_TYPE,
                "common_tls_context": {
                    "alpn_protocols": ["h2", "http/1.1"],
                    "tls_certificates": [
                        {"certificate_chain": {"filename": str(cert)}, "private_key": {"filename": str(key)}}
                    ],
                },
            },
        },
    }
    return b.bootstrap([b.listener("tls", port, [chain])], [b.cluster("upstream", upstream_port)])


def curl_tls(port: int, cert: Path, version_flag: str) -> tuple[str, dict]:
    completed = subprocess.run(
        [
            "curl", "-sS", "--max-time", "10", version_flag, "--cacert", str(cert),
            "--resolve", f"proxy.test:{port}:127.0.0.1", "-w", "\n%{http_version}",
            f"https://proxy.test:{port}/over-tls",
        ],
        capture_output=True, text=True, timeout=20,
    )
    assert completed.returncode == 0, completed.stderr
    body, _, http_version = completed.stdout.rpartition("\n")
    return http_version, json.loads(body)


def test_tls_terminates_http2_and_http1_by_alpn(dataplane, echo_a, port, tmp_path):
    cert, key = write_self_signed(tmp_path)
    dataplane(tls_proxy(port, echo_a.port, cert, key))

    version, echoed = curl_tls(port, cert, "--http2")
    assert version == "2"
    assert (echoed["name"], echoed["path"]) == ("a", "/over-tls")

    version, echoed = curl_tls(port, cert, "--http1.1")
    assert version == "1.1"
    assert (echoed["name"], echoed["path"]) == ("a", "/over-tls")
    assert echoed["headers"].get("x-forwarded-proto") == "https"


def raw_exchange(port: int, payload: bytes, timeout: float = 10.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(payload)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        return received


def test_oversized_request_headers_get_431(dataplane, echo_a, port):
    dataplane(b.simple_proxy(port, echo_a.port))
    # Envoy's default limit is 60 KiB of request headers; meshctl's too.
    huge = b"x-big: " + b"a" * (70 * 1024) + b"\r\n"
    response = raw_exchange(port, b"GET / HTTP/1.1\r\nhost: x\r\n" + huge + b"\r\n")
    assert response.startswith(b"HTTP/1.1 431"), response[:200]


def test_too_many_request_headers_get_431(dataplane, echo_a, port):
    dataplane(b.simple_proxy(port, echo_a.port))
    # Envoy's default max_headers_count is 100; meshctl's too.
    many = b"".join(b"x-h%d: v\r\n" % i for i in range(150))
    response = raw_exchange(port, b"GET / HTTP/1.1\r\nhost: x\r\n" + many + b"\r\n")
    assert response.startswith(b"HTTP/1.1 431"), response[:200]


def test_slow_request_headers_are_cut_off(dataplane, echo_a, port):
    """Slowloris: a client that never finishes its request head loses the connection."""
    config = b.simple_proxy(port, echo_a.port)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["request_headers_timeout"] = "1s"
    dataplane(config)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n")
        started = time.monotonic()
        received = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        elapsed = time.monotonic() - started
    assert elapsed < 5, f"connection held {elapsed:.1f}s"
    # Either a bare close or a 408 before closing; never a proxied request.
    assert received == b"" or received.startswith(b"HTTP/1.1 408"), received[:200]


def test_http2_stream_limit_is_advertised_and_enforced(dataplane, echo_a, port):
    config = b.simple_proxy(port, echo_a.port)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http2_protocol_options"] = {"max_concurrent_streams": 5}
    dataplane(config)
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    connection.initiate_connection()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(connection.data_to_send())
        advertised = None
        deadline = time.monotonic() + 10
        while advertised is None and time.monotonic() < deadline:
            for event in connection.receive_data(sock.recv(65536)):
                if isinstance(event, h2.events.RemoteSettingsChanged):
                    changed = event.changed_settings.get(h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS)
                    if changed is not None:
                        advertised = changed.new_value
            sock.sendall(connection.data_to_send())
    assert advertised == 5


@pytest.mark.meshctl_only
def test_admin_endpoints(meshctl_dataplane, echo_a, port):
    admin_port = free_port()
    config = b.simple_proxy(port, echo_a.port)
    config["admin"] = {"address": b.socket_address(admin_port)}
    meshctl_dataplane(config)
    subprocess.run(["curl", "-sS", "-o", "/dev/null", f"http://127.0.0.1:{port}/count-me"], check=True, timeout=20)

    def admin(path: str) -> tuple[int, str]:
        completed = subprocess.run(
            ["curl", "-sS", "-w", "\n%{http_code}", f"http://127.0.0.1:{admin_port}{path}"],
            capture_output=True, text=True, timeout=20, check=True,
        )
        body, _, code = completed.stdout.rpartition("\n")
        return int(code), body

    assert admin("/ready") == (200, "LIVE\n")
    code, stats = admin("/stats/prometheus")
    assert code == 200
    assert 'meshctl_downstream_rs_total{listener="http",code_class="2xx"} 1' in stats
    assert 'meshctl_upstream_rq_total{cluster="upstream"} 1' in stats
    assert 'meshctl_route_rq_time_ms_count{route="local/all/0"} 1' in stats
    code, dump = admin("/config_dump")
    assert code == 200
    parsed = json.loads(dump)
    assert parsed["listeners"][0]["config"]["name"] == "http"
    assert parsed["clusters"][0]["endpoints"][0]["address"] == f"127.0.0.1:{echo_a.port}"


def test_idle_keep_alive_connections_are_closed(dataplane, echo_a, port):
    config = b.simple_proxy(port, echo_a.port)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["common_http_protocol_options"] = {"idle_timeout": "1s"}
    dataplane(config)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /once HTTP/1.1\r\nhost: x\r\n\r\n")
        received = b""
        while b'"name": "a"' not in received:
            chunk = sock.recv(65536)
            assert chunk, "closed before the response"
            received += chunk
        started = time.monotonic()
        while sock.recv(65536):
            pass
        elapsed = time.monotonic() - started
    # Envoy closes ~1 s idle + its 5 s drain_timeout later; meshctl closes right at the idle timeout.
    assert 0.5 < elapsed < 10, f"idle connection closed after {elapsed:.1f}s"
