"""The engine's mTLS identity layer through meshctl._core.Engine: two engines from static bootstraps
(client → A plaintext → mTLS h2 → B → plain app), XFCC, foreign CAs, hot-swapped certificates,
CRLs (meshctl only; Envoy interop and the large negative matrix live in test_mtls_*.py)."""

from __future__ import annotations

import datetime
import hashlib
import json
import re
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from helpers import bootstrap as b
from helpers.ports import free_port

pytestmark = pytest.mark.meshctl_only

SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
DOWNSTREAM_TLS_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
UPSTREAM_TLS_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
HTTP_OPTIONS_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
HTTP_OPTIONS_TYPE = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
ADS = {"ads": {}, "resource_api_version": "V3"}
SPIFFE_A = "spiffe://cluster.local/ns/default/sa/a"
SPIFFE_B = "spiffe://cluster.local/ns/default/sa/b"
NOW = datetime.datetime.now(datetime.timezone.utc)


# --- a tiny CA ---------------------------------------------------------------------------------

@dataclass
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    @property
    def key_pem(self) -> str:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
        cert_path.write_text(self.cert_pem)
        key_path.write_text(self.key_pem)
        return cert_path, key_path


class CertificateAuthority:
    def __init__(self, name: str):
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - datetime.timedelta(hours=1))
            .not_valid_after(NOW + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .sign(self.key, hashes.SHA256())
        )
        self.revoked: list[int] = []

    @property
    def root_pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    def issue(self, spiffe_id: str) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshctl-test")]))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - datetime.timedelta(minutes=5))
            .not_valid_after(NOW + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
            )
            .add_extension(
                x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True
            )
            .sign(self.key, hashes.SHA256())
        )
        return Issued(cert, key)

    def crl_pem(self, issued: datetime.datetime = NOW - datetime.timedelta(minutes=1)) -> str:
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.name)
            .last_update(issued)
            .next_update(NOW + datetime.timedelta(days=1))
            .add_extension(x509.CRLNumber(len(self.revoked) + 1), critical=False)
        )
        for serial in self.revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(NOW).build()
            )
        return builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


# --- the plain app behind engine B ---------------------------------------------------------------

class App:
    """Answers every request with the headers it received, and counts connections it accepted."""

    def __init__(self):
        app = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                app.requests.append(dict(self.headers.items()))
                body = json.dumps({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def get_request(self):
                accepted = super().get_request()
                app.connections += 1
                return accepted

        self.requests: list[dict] = []
        self.connections = 0
        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


# --- engines from static bootstraps ---------------------------------------------------------------

def sds(name: str) -> dict:
    return {"name": name, "sds_config": ADS}


def inbound_b(port: int, app_port: int) -> dict:
    """Engine B: mTLS-only inbound listener (Istio's shape) in front of the plain app."""
    routes = b.route_configuration("inbound", [b.virtual_host("all", [b.route("app")])])
    hcm = b.http_connection_manager(
        routes,
        stat_prefix="inbound",
        forward_client_cert_details="SANITIZE_SET",
        set_current_client_cert_details={"uri": True},
    )
    chain = {
        "filter_chain_match": {"transport_protocol": "tls"},
        "filters": [hcm],
        "transport_socket": {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": DOWNSTREAM_TLS_TYPE,
                "require_client_certificate": True,
                "common_tls_context": {
                    "alpn_protocols": ["h2", "http/1.1"],
                    "tls_certificate_sds_secret_configs": [sds("default")],
                    "combined_validation_context": {
                        "default_validation_context": {
                            "match_typed_subject_alt_names": [
                                {"san_type": "URI", "matcher": {"prefix": "spiffe://cluster.local/"}}
                            ]
                        },
                        "validation_context_sds_secret_config": sds("ROOTCA"),
                    },
                },
            },
        },
    }
    listener = b.listener("inbound", port, [chain], listener_filters=[
        {"name": "envoy.filters.listener.tls_inspector",
         "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}},
    ])
    return b.bootstrap([listener], [b.cluster("app", app_port)])


def outbound_a(port: int, b_port: int, expected: str = SPIFFE_B) -> dict:
    """Engine A: plaintext listener, its cluster to B over mTLS h2 expecting B's SPIFFE ID."""
    routes = b.route_configuration("outbound", [b.virtual_host("all", [b.route("b")])])
    cluster = b.cluster("b", b_port)
    cluster["typed_extension_protocol_options"] = {
        HTTP_OPTIONS_KEY: {"@type": HTTP_OPTIONS_TYPE, "explicit_http_config": {"http2_protocol_options": {}}}
    }
    cluster["transport_socket"] = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": UPSTREAM_TLS_TYPE,
            "sni": "outbound_.80_._.b.default.svc.cluster.local",
            "common_tls_context": {
                "alpn_protocols": ["h2"],
                "tls_certificate_sds_secret_configs": [sds("default")],
                "combined_validation_context": {
                    "default_validation_context": {
                        "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": expected}}]
                    },
                    "validation_context_sds_secret_config": sds("ROOTCA"),
                },
            },
        },
    }
    return b.bootstrap([b.http_listener("outbound", port, routes)], [cluster])


def certificate_secret(issued: Issued) -> dict:
    return {
        "name": "default",
        "tls_certificate": {
            "certificate_chain": {"inline_string": issued.cert_pem},
            "private_key": {"inline_string": issued.key_pem},
        },
    }


def roots_secret(ca: CertificateAuthority, with_crl: bool = False, crl_issued: datetime.datetime | None = None) -> dict:
    context = {"trusted_ca": {"inline_string": ca.root_pem}}
    if with_crl:
        context["crl"] = {"inline_string": ca.crl_pem(*([crl_issued] if crl_issued else []))}
    return {"name": "ROOTCA", "validation_context": context}


def apply_secrets(engine, *secrets: dict) -> None:
    from meshctl.agent.bootstrap import resource_to_bytes

    engine.apply(SECRET_TYPE, [resource_to_bytes(SECRET_TYPE, s) for s in secrets])


def counter(stats: str, name: str, **labels: str) -> int:
    label_text = ",".join(f'{key}="{value}"' for key, value in labels.items())
    match = re.search(rf"^{re.escape(name)}{{{re.escape(label_text)}}} (\d+)$", stats, re.M)
    return int(match.group(1)) if match else 0


@dataclass
class Mesh:
    ca: CertificateAuthority
    app: App
    a: object
    b: object
    a_port: int
    b_port: int
    cert_a: Issued
    cert_b: Issued
    directory: Path


@pytest.fixture
def mesh(tmp_path):
    import meshctl._core as core
    from meshctl.agent.bootstrap import bootstrap_from_dict

    ca = CertificateAuthority("meshctl test root")
    app = App()
    a_port, b_port = free_port(), free_port()
    engine_b = core.Engine(bootstrap_from_dict(inbound_b(b_port, app.port)))
    engine_a = core.Engine(bootstrap_from_dict(outbound_a(a_port, b_port)))
    cert_a, cert_b = ca.issue(SPIFFE_A), ca.issue(SPIFFE_B)
    apply_secrets(engine_a, certificate_secret(cert_a), roots_secret(ca))
    apply_secrets(engine_b, certificate_secret(cert_b), roots_secret(ca))
    yield Mesh(ca, app, engine_a, engine_b, a_port, b_port, cert_a, cert_b, tmp_path)
    engine_a.stop()
    engine_b.stop()
    app.stop()


def curl(port: int, *args: str, path: str = "/hello") -> tuple[str, dict]:
    completed = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "-w", "\n%{http_version}", *args, f"http://127.0.0.1:{port}{path}"],
        capture_output=True, text=True, timeout=20,
    )
    assert completed.returncode == 0, completed.stderr
    body, _, version = completed.stdout.rpartition("\n")
    return version, json.loads(body)


def client_context(ca: CertificateAuthority, client: Issued | None, directory: Path) -> ssl.SSLContext:
    """A TLS client that trusts `ca` and presents `client` (B's certificate has only a URI SAN,
    so the host name is not checked here; the chain is)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    root = directory / "root.pem"
    root.write_text(ca.root_pem)
    context.load_verify_locations(str(root))
    if client is not None:
        cert_path, key_path = client.write(directory, f"client-{client.cert.serial_number}")
        context.load_cert_chain(str(cert_path), str(key_path))
    context.set_alpn_protocols(["http/1.1"])
    return context


class TlsHttp1:
    """One keep-alive HTTP/1.1 connection over TLS, straight to engine B."""

    def __init__(self, port: int, context: ssl.SSLContext):
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock = context.wrap_socket(raw, server_hostname="b.default.svc.cluster.local")
        self.buffer = b""

    def server_certificate(self) -> x509.Certificate:
        return x509.load_der_x509_certificate(self.sock.getpeercert(binary_form=True))

    def get(self, path: str) -> tuple[int, dict]:
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nhost: b\r\n\r\n".encode())
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed before a response")
            self.buffer += chunk
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
        while len(rest) < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed mid-body")
            rest += chunk
        self.buffer = rest[length:]
        return int(head.split()[1]), json.loads(rest[:length])

    def close(self):
        self.sock.close()


# --- the tests -----------------------------------------------------------------------------------

def test_client_to_a_to_b_over_mtls_h2_and_the_app_gets_xfcc(mesh):
    for flag in ("--http1.1", "--http2-prior-knowledge"):
        _, echoed = curl(mesh.a_port, flag, "-H", "x-forwarded-client-cert: By=spiffe://forged;URI=spiffe://evil")
        expected_hash = hashlib.sha256(mesh.cert_a.cert.public_bytes(serialization.Encoding.DER)).hexdigest()
        assert echoed["headers"]["x-forwarded-client-cert"] == f"By={SPIFFE_B};Hash={expected_hash};URI={SPIFFE_A}"
        assert echoed["path"] == "/hello"

    stats_a, stats_b = mesh.a.stats_prometheus(), mesh.b.stats_prometheus()
    # Both requests shared one multiplexed mTLS connection between the engines.
    assert counter(stats_a, "meshctl_tls_handshakes_total", direction="upstream") == 1
    assert counter(stats_b, "meshctl_tls_handshakes_total", direction="downstream") == 1
    assert counter(stats_b, "meshctl_downstream_requests_by_peer_total", peer_principal=SPIFFE_A) == 2

    dump = json.loads(mesh.b.config_dump())
    secrets = {s["name"]: s for s in dump["secrets"]}
    assert secrets["default"]["spiffe_id"] == SPIFFE_B
    assert int(secrets["default"]["chain"][0]["serial"], 16) == mesh.cert_b.cert.serial_number
    assert secrets["ROOTCA"]["trusted_ca"][0]["not_after"]
    text = mesh.b.config_dump()
    assert "PRIVATE KEY" not in text and "BEGIN CERTIFICATE" not in text


def test_http1_pools_use_mtls_too(mesh):
    """A cluster without HTTP/2 options keeps HTTP/1.1 connections to B, each over mTLS."""
    import meshctl._core as core
    from meshctl.agent.bootstrap import bootstrap_from_dict

    port = free_port()
    config = outbound_a(port, mesh.b_port)
    cluster = config["static_resources"]["clusters"][0]
    del cluster["typed_extension_protocol_options"]
    cluster["transport_socket"]["typed_config"]["common_tls_context"]["alpn_protocols"] = ["http/1.1"]
    engine = core.Engine(bootstrap_from_dict(config))
    try:
        apply_secrets(engine, certificate_secret(mesh.cert_a), roots_secret(mesh.ca))
        for attempt in range(3):
            _, echoed = curl(port, "--http1.1", path=f"/h1-{attempt}")
            assert echoed["headers"]["x-forwarded-client-cert"].endswith(f";URI={SPIFFE_A}")
        # Kept alive and reused: one handshake for three requests.
        assert counter(engine.stats_prometheus(), "meshctl_tls_handshakes_total", direction="upstream") == 1
    finally:
        engine.stop()


def test_a_wrong_server_identity_is_refused_by_the_client_engine(mesh):
    import meshctl._core as core
    from meshctl.agent.bootstrap import bootstrap_from_dict

    port = free_port()
    expecting_c = core.Engine(bootstrap_from_dict(outbound_a(port, mesh.b_port, expected="spiffe://cluster.local/ns/default/sa/c")))
    try:
        apply_secrets(expecting_c, certificate_secret(mesh.cert_a), roots_secret(mesh.ca))
        completed = subprocess.run(
            ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10", f"http://127.0.0.1:{port}/x"],
            capture_output=True, text=True, timeout=20,
        )
        assert completed.stdout == "503"
        stats = expecting_c.stats_prometheus()
        assert counter(stats, "meshctl_tls_handshake_errors_total", direction="upstream", reason="bad_san") == 1
        assert mesh.app.connections == 0
    finally:
        expecting_c.stop()


def test_a_client_certificate_from_a_foreign_ca_is_refused_before_the_app(mesh):
    foreign = CertificateAuthority("someone else's root")
    impostor = foreign.issue(SPIFFE_A)
    context = client_context(mesh.ca, impostor, mesh.directory)
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        connection = TlsHttp1(mesh.b_port, context)
        connection.get("/should-not-arrive")
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        TlsHttp1(mesh.b_port, client_context(mesh.ca, None, mesh.directory)).get("/no-certificate")
    assert mesh.app.connections == 0 and mesh.app.requests == []
    stats = mesh.b.stats_prometheus()
    assert counter(stats, "meshctl_tls_handshake_errors_total", direction="downstream", reason="unknown_ca") == 1
    assert counter(stats, "meshctl_tls_handshake_errors_total", direction="downstream", reason="no_client_cert") == 1


def test_a_new_default_certificate_is_used_by_new_connections_and_open_ones_keep_working(mesh):
    keep_alive = TlsHttp1(mesh.b_port, client_context(mesh.ca, mesh.ca.issue(SPIFFE_A), mesh.directory))
    assert keep_alive.get("/before")[0] == 200
    assert keep_alive.server_certificate().serial_number == mesh.cert_b.cert.serial_number
    # The engines' shared h2 connection is open too.
    assert curl(mesh.a_port, "--http1.1", path="/before")[1]["path"] == "/before"
    handshakes_before = counter(mesh.b.stats_prometheus(), "meshctl_tls_handshakes_total", direction="downstream")

    renewed = mesh.ca.issue(SPIFFE_B)
    apply_secrets(mesh.b, certificate_secret(renewed))

    assert keep_alive.get("/after")[0] == 200
    assert curl(mesh.a_port, "--http2-prior-knowledge", path="/after")[1]["path"] == "/after"
    # Both open connections were kept: no new handshake happened on B.
    assert counter(mesh.b.stats_prometheus(), "meshctl_tls_handshakes_total", direction="downstream") == handshakes_before
    fresh = TlsHttp1(mesh.b_port, client_context(mesh.ca, mesh.ca.issue(SPIFFE_A), mesh.directory))
    assert fresh.get("/fresh")[0] == 200
    assert fresh.server_certificate().serial_number == renewed.cert.serial_number
    keep_alive.close()
    fresh.close()


def test_a_crl_in_rootca_refuses_the_revoked_client_on_its_next_handshake(mesh):
    revoked, kept = mesh.ca.issue(SPIFFE_A), mesh.ca.issue(SPIFFE_A)
    assert TlsHttp1(mesh.b_port, client_context(mesh.ca, revoked, mesh.directory)).get("/before")[0] == 200
    requests_before = len(mesh.app.requests)

    mesh.ca.revoked.append(revoked.cert.serial_number)
    apply_secrets(mesh.b, roots_secret(mesh.ca, with_crl=True))

    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        TlsHttp1(mesh.b_port, client_context(mesh.ca, revoked, mesh.directory)).get("/revoked")
    assert len(mesh.app.requests) == requests_before
    assert TlsHttp1(mesh.b_port, client_context(mesh.ca, kept, mesh.directory)).get("/kept")[0] == 200
    stats = mesh.b.stats_prometheus()
    assert counter(stats, "meshctl_tls_handshake_errors_total", direction="downstream", reason="revoked") == 1
    dump = json.loads(mesh.b.config_dump())
    rootca = next(s for s in dump["secrets"] if s["name"] == "ROOTCA")
    assert int(rootca["crls"][0]["revoked_serials"][0], 16) == revoked.cert.serial_number


def test_a_crl_reissued_with_the_same_revocations_keeps_open_connections_a_new_revocation_drains_them(mesh):
    """A restarted control plane re-issues its CRLs (a new date, the same serials): nothing a
    connection was verified against changed, so it must not be closed under the app's requests."""
    mesh.ca.revoked.append(mesh.ca.issue(SPIFFE_A).cert.serial_number)
    apply_secrets(mesh.b, roots_secret(mesh.ca, with_crl=True))
    keep_alive = TlsHttp1(mesh.b_port, client_context(mesh.ca, mesh.ca.issue(SPIFFE_A), mesh.directory))
    assert keep_alive.get("/before")[0] == 200
    handshakes = counter(mesh.b.stats_prometheus(), "meshctl_tls_handshakes_total", direction="downstream")

    reissued = NOW.replace(microsecond=0)
    apply_secrets(mesh.b, roots_secret(mesh.ca, with_crl=True, crl_issued=reissued))
    rootca = next(s for s in json.loads(mesh.b.config_dump())["secrets"] if s["name"] == "ROOTCA")
    assert rootca["crls"][0]["this_update"] == reissued.strftime("%Y-%m-%dT%H:%M:%SZ")  # it was applied
    time.sleep(0.3)  # a drain would have closed the idle connection by now
    assert keep_alive.get("/after-reissue")[0] == 200
    assert counter(mesh.b.stats_prometheus(), "meshctl_tls_handshakes_total", direction="downstream") == handshakes

    mesh.ca.revoked.append(mesh.ca.issue(SPIFFE_A).cert.serial_number)  # a real change
    apply_secrets(mesh.b, roots_secret(mesh.ca, with_crl=True, crl_issued=reissued))
    time.sleep(0.3)
    with pytest.raises((ConnectionError, OSError)):
        keep_alive.get("/after-revocation")
    keep_alive.close()


def test_opaque_tcp_between_engines_goes_over_mtls(mesh):
    """A tcp_proxy on A → UpstreamTlsContext (ALPN meshctl-tcp) → B's TLS chain → tcp_proxy → app."""
    import meshctl._core as core
    from meshctl.agent.bootstrap import bootstrap_from_dict

    echo = socket.create_server(("127.0.0.1", 0))
    echo_port = echo.getsockname()[1]

    def serve_echo():
        while True:
            try:
                connection, _ = echo.accept()
            except OSError:
                return
            with connection:
                while data := connection.recv(65536):
                    connection.sendall(data.upper())

    threading.Thread(target=serve_echo, daemon=True).start()
    a_port, b_port = free_port(), free_port()
    tls_chain = inbound_b(b_port, echo_port)["static_resources"]["listeners"][0]["filter_chains"][0]
    tls_chain["filter_chain_match"]["application_protocols"] = ["meshctl-tcp"]
    tls_chain["transport_socket"]["typed_config"]["common_tls_context"]["alpn_protocols"] = ["meshctl-tcp"]
    tls_chain["filters"] = [b.tcp_proxy("app")]
    inbound = b.bootstrap([b.listener("inbound-tcp", b_port, [tls_chain])], [b.cluster("app", echo_port)])
    outbound = outbound_a(a_port, b_port)
    outbound["static_resources"]["listeners"] = [b.listener("outbound-tcp", a_port, [{"filters": [b.tcp_proxy("b")]}])]
    cluster = outbound["static_resources"]["clusters"][0]
    del cluster["typed_extension_protocol_options"]
    cluster["transport_socket"]["typed_config"]["common_tls_context"]["alpn_protocols"] = ["meshctl-tcp"]
    engine_b = core.Engine(bootstrap_from_dict(inbound))
    engine_a = core.Engine(bootstrap_from_dict(outbound))
    try:
        apply_secrets(engine_a, certificate_secret(mesh.cert_a), roots_secret(mesh.ca))
        apply_secrets(engine_b, certificate_secret(mesh.cert_b), roots_secret(mesh.ca))
        with socket.create_connection(("127.0.0.1", a_port), timeout=10) as client:
            client.sendall(b"opaque bytes\n")
            received = b""
            while len(received) < len(b"opaque bytes\n"):
                chunk = client.recv(65536)
                assert chunk, "closed before the echo"
                received += chunk
        assert received == b"OPAQUE BYTES\n"
        assert counter(engine_a.stats_prometheus(), "meshctl_tls_handshakes_total", direction="upstream") == 1
        assert counter(engine_b.stats_prometheus(), "meshctl_tls_handshakes_total", direction="downstream") == 1
    finally:
        engine_a.stop()
        engine_b.stop()
        echo.close()
