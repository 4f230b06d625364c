"""Negative certificate matrix: every defective client or server certificate is refused with zero application bytes forwarded, on Envoy and meshctl."""

from __future__ import annotations

import http.client
import re
import socket
import ssl
import time
from pathlib import Path

import pytest
from helpers import pki
from helpers.counting_app import CountingApp
from helpers.dataplane import start_dataplane
from helpers.mtls_bootstrap import MeshUpstream, TlsFiles, client_sidecar, server_sidecar
from helpers.ports import free_port
from helpers.procs import Process

CLIENT_ID = pki.spiffe_id("client")
SERVER_ID = pki.spiffe_id("server")

# Made once at import so the parameter lists below name real certificates; a few RSA keys, < 1 s.
PKI = pki.MatrixPki.create()
CLIENT_DEFECTS = {d.name: d for d in pki.defects(PKI, CLIENT_ID, role="client")}
SERVER_DEFECTS = {d.name: d for d in pki.defects(PKI, SERVER_ID, role="server")}
CLIENT_CONTROLS = pki.positive_controls(PKI, CLIENT_ID)
SERVER_CONTROLS = pki.positive_controls(PKI, SERVER_ID)
# The sidecars' own, well-formed identities.
SERVER_SIDECAR_CERT = PKI.root.workload(SERVER_ID)
CLIENT_SIDECAR_CERT = PKI.root.workload(CLIENT_ID)

# Where Envoy 1.40 (BoringSSL, default settings) is known to accept a certificate the SPIFFE
# rules refuse. The matrix asserts Envoy's actual behaviour for these (xfail strict: if Envoy
# starts refusing, the test says so), and meshctl must refuse every one of them.
ENVOY_ACCEPTS: dict[tuple[str, str], str] = {
    (role, name): why
    for role in ("client", "server")
    for name, why in {
        "two-uri-sans": "match_typed_subject_alt_names matches any one SAN; it does not require exactly one URI SAN",
        "ca-as-leaf": "BoringSSL does not reject basicConstraints CA:TRUE on the end-entity certificate",
        "sha1-signature": "BoringSSL still verifies sha1WithRSAEncryption signatures in certificate chains",
        "rsa-1024": "no minimum RSA key size for peer certificates",
    }.items()
}

# (role, defect) -> {plane: outcome}, printed as a table when the module ends.
OUTCOMES: dict[tuple[str, str], dict[str, str]] = {}


@pytest.fixture(scope="module")
def certs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("mtls-matrix")
    # Written after every defect exists, so the CRL lists the revoked client and server leaves.
    trust = pki.write_trust(directory, [PKI.root], [PKI.root, PKI.intermediate])
    for name, issued in [
        ("server-sidecar", SERVER_SIDECAR_CERT),
        ("client-sidecar", CLIENT_SIDECAR_CERT),
    ]:
        issued.write(directory, name)
    assert trust.ca.exists() and trust.crl.exists()
    return directory


def trust_files(certs_dir: Path, stem: str) -> TlsFiles:
    return TlsFiles(
        cert=certs_dir / f"{stem}.crt",
        key=certs_dir / f"{stem}.key",
        ca=certs_dir / "trust-ca.pem",
        crl=certs_dir / "trust-crl.pem",
    )


@pytest.fixture(scope="module", autouse=True)
def outcome_table(request: pytest.FixtureRequest):
    """Print which defect was refused by which data plane once the module's tests are done."""
    yield
    if not OUTCOMES:
        return
    planes = sorted({plane for row in OUTCOMES.values() for plane in row})
    lines = [
        "",
        "mTLS certificate matrix (outcome per data plane):",
        f"| role | certificate | {' | '.join(planes)} |",
        "|---|---|" + "---|" * len(planes),
    ]
    for (role, name), row in sorted(OUTCOMES.items()):
        lines.append(f"| {role} | {name} | {' | '.join(row.get(p, '-') for p in planes)} |")
    # Shown even without -s: the table is the point of the matrix.
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\n".join(lines), flush=True)


class Planes:
    """Sidecars started once per data plane for the whole module (each start costs ~1 s), stopped by PID at the end."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[Process] = []
        self.apps: list[CountingApp] = []
        self.admin_ports: dict[tuple[str, str], int] = {}  # (kind, "server"/"client") -> port
        self._server_sides: dict[str, tuple[Process, int, CountingApp]] = {}
        self._client_sides: dict[str, tuple[Process, int, dict[str, CountingApp]]] = {}

    def start(self, kind: str, config: dict, label: str) -> Process:
        run_dir = self.directory / f"{kind}-{label}"
        run_dir.mkdir(exist_ok=True)
        process = start_dataplane(kind, config, run_dir)
        self.started.append(process)
        return process

    def server_side(self, kind: str) -> tuple[int, CountingApp]:
        """The server sidecar (accepts exactly spiffe://cluster.local/ns/default/sa/client) and its app."""
        if kind not in self._server_sides:
            app = CountingApp()
            self.apps.append(app)
            port = free_port()
            self.admin_ports[(kind, "server")] = free_port()
            config = server_sidecar(
                port,
                app.port,
                trust_files(self.directory, "server-sidecar"),
                san_matchers=[{"exact": CLIENT_ID}],
                admin_port=self.admin_ports[(kind, "server")],
            )
            self._server_sides[kind] = (self.start(kind, config, "server"), port, app)
        _, port, app = self._server_sides[kind]
        return port, app

    def client_side(self, kind: str) -> tuple[int, dict[str, CountingApp]]:
        """The client sidecar with one route + cluster per server certificate, each to its own TLS app."""
        if kind not in self._client_sides:
            apps, upstreams = {}, []
            for name, issued in [
                *SERVER_CONTROLS.items(),
                *((d.name, d.issued) for d in SERVER_DEFECTS.values() if d.presentable),
            ]:
                apps[name] = CountingApp(tls=server_tls_context(issued, self.directory, name))
                self.apps.append(apps[name])
                upstreams.append(MeshUpstream(name, f"/{name}/", apps[name].port, SERVER_ID))
            port = free_port()
            self.admin_ports[(kind, "client")] = free_port()
            config = client_sidecar(
                port,
                upstreams,
                trust_files(self.directory, "client-sidecar"),
                admin_port=self.admin_ports[(kind, "client")],
            )
            self._client_sides[kind] = (self.start(kind, config, "client"), port, apps)
        _, port, apps = self._client_sides[kind]
        return port, apps

    def close(self) -> None:
        for process in self.started:
            process.stop()
        for app in self.apps:
            app.stop()


@pytest.fixture(scope="module")
def planes(certs_dir: Path):
    started = Planes(certs_dir)
    yield started
    started.close()


def weak_crypto_allowed(context: ssl.SSLContext) -> None:
    # OpenSSL's default security level refuses 1024-bit RSA and SHA-1 even to *send*; level 0
    # lets our side present them so that the sidecar under test is the one that decides.
    context.set_ciphers("DEFAULT:@SECLEVEL=0")


def server_tls_context(issued: pki.Issued, directory: Path, stem: str) -> ssl.SSLContext:
    """A TLS server presenting `issued` (h2 by ALPN), standing in for a peer sidecar with that certificate."""
    cert, key = issued.write(directory, f"server-{stem}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    weak_crypto_allowed(context)
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["h2"])
    return context


def request_with_client_cert(port: int, issued: pki.Issued, directory: Path, stem: str) -> str:
    """One HTTP/1.1 GET over TLS presenting `issued`; returns "200", "403"... or "refused: <why>"."""
    cert, key = issued.write(directory, f"client-{stem}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    weak_crypto_allowed(context)
    context.load_verify_locations(directory / "trust-ca.pem")
    context.check_hostname = False  # the server sidecar's certificate names a SPIFFE ID, not a host
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["http/1.1"])
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            context.wrap_socket(raw) as tls,
        ):
            tls.sendall(b"GET /matrix HTTP/1.1\r\nhost: server\r\nconnection: close\r\n\r\n")
            received = b""
            while chunk := tls.recv(65536):
                received += chunk
    except ssl.SSLEOFError:
        return "refused: closed during TLS"
    except ssl.SSLError as error:
        return f"refused: alert {error.reason}"  # e.g. SSLV3_ALERT_CERTIFICATE_EXPIRED
    except OSError as error:
        return f"refused: {type(error).__name__}"
    if not received:
        return "refused: closed without a response"
    return received.split(b" ", 2)[1].decode()


def request_through_client_sidecar(port: int, path: str) -> str:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path, headers={"host": "server"})
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    if response.status == 200:
        return "200"
    print(f"{path}: {response.status} {body[:200]!r}")
    return f"refused: {response.status}"


# meshctl counts each refused handshake by reason (meshctl_tls_handshake_errors_total), so an
# operator sees why a peer was turned away; where the reason is unambiguous the matrix checks it.
EXPECTED_REASON = {
    "expired": "expired",
    "not-yet-valid": "not_yet_valid",
    "revoked": "revoked",
    "foreign-ca": "unknown_ca",
    "intermediate-not-sent": "unknown_ca",
    "wrong-trust-domain": "bad_san",
    "wrong-service-account": "bad_san",
    "two-uri-sans": "bad_san",
    "dns-san-only": "bad_san",
    "no-san": "bad_san",
    "non-spiffe-uri": "bad_san",
    "nul-in-uri-san": "bad_san",
    "eku-without-clientAuth": "bad_usage",
    "eku-without-serverAuth": "bad_usage",
}


def handshake_errors(admin_port: int, direction: str) -> dict[str, int]:
    """meshctl's refused handshakes in one direction, by reason, from its admin endpoint."""
    connection = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=5)
    try:
        connection.request("GET", "/stats/prometheus")
        text = connection.getresponse().read().decode()
    finally:
        connection.close()
    found = re.findall(
        rf'^meshctl_tls_handshake_errors_total{{direction="{direction}",reason="([^"]+)"}} (\d+)$',
        text,
        re.MULTILINE,
    )
    return {reason: int(count) for reason, count in found}


class RefusalReasons:
    """Counts meshctl's handshake errors around one attempt (nothing for Envoy)."""

    def __init__(self, planes: Planes, kind: str, side: str) -> None:
        self.admin, self.direction = (
            planes.admin_ports[(kind, side)],
            {
                "server": "downstream",
                "client": "upstream",
            }[side],
        )
        self.enabled = kind == "meshctl"
        self.before = handshake_errors(self.admin, self.direction) if self.enabled else {}

    def new(self) -> set[str]:
        if not self.enabled:
            return set()
        deadline = time.monotonic() + 3
        while True:  # the counter is bumped as the handshake fails, a moment after the alert
            after = handshake_errors(self.admin, self.direction)
            grown = {r for r, n in after.items() if n > self.before.get(r, 0)}
            if grown or time.monotonic() > deadline:
                return grown
            time.sleep(0.05)


def check_reason(kind: str, name: str, reasons: set[str]) -> None:
    """meshctl must have counted the refusal, under the expected reason where it is unambiguous."""
    if kind != "meshctl":
        return
    assert reasons, (
        "meshctl refused the handshake but counted no meshctl_tls_handshake_errors_total"
    )
    if name in EXPECTED_REASON:
        assert EXPECTED_REASON[name] in reasons, f"counted as {sorted(reasons)}"


def record(role: str, name: str, kind: str, outcome: str) -> None:
    OUTCOMES.setdefault((role, name), {})[kind] = outcome


def expect_envoy_quirk(request: pytest.FixtureRequest, kind: str, role: str, name: str) -> None:
    why = ENVOY_ACCEPTS.get((role, name))
    if kind == "envoy" and why:
        request.applymarker(pytest.mark.xfail(strict=True, reason=f"Envoy 1.40 accepts it: {why}"))


# --- client certificates presented to the server sidecar ----------------------------------


@pytest.mark.parametrize("name", list(CLIENT_CONTROLS))
def test_good_client_certificate_reaches_the_app(dataplane_kind, name, planes, certs_dir):
    port, app = planes.server_side(dataplane_kind)
    before = app.wait_quiet()
    outcome = request_with_client_cert(port, CLIENT_CONTROLS[name], certs_dir, name)
    after = app.wait_quiet()
    record(
        "client", f"(control) {name}", dataplane_kind, "accepted" if outcome == "200" else outcome
    )
    assert outcome == "200"
    assert after.requests - before.requests == 1


@pytest.mark.parametrize("name", [d.name for d in CLIENT_DEFECTS.values() if d.presentable])
def test_bad_client_certificate_is_refused_before_the_app(
    dataplane_kind, name, planes, certs_dir, request
):
    expect_envoy_quirk(request, dataplane_kind, "client", name)
    port, app = planes.server_side(dataplane_kind)
    before = app.wait_quiet()
    counted = RefusalReasons(planes, dataplane_kind, "server")
    outcome = request_with_client_cert(port, CLIENT_DEFECTS[name].issued, certs_dir, name)
    after = app.wait_quiet()
    reached = after.bytes - before.bytes
    reasons = counted.new()
    record(
        "client",
        name,
        dataplane_kind,
        (outcome if reached == 0 else f"ACCEPTED ({outcome}, {reached} B to app)")
        + (f" [{','.join(sorted(reasons))}]" if reasons else ""),
    )
    assert outcome.startswith("refused"), f"{CLIENT_DEFECTS[name].why}: answered {outcome}"
    assert reached == 0 and after.requests == before.requests
    check_reason(dataplane_kind, name, reasons)


# --- server certificates presented to the client sidecar ----------------------------------


@pytest.mark.parametrize("name", list(SERVER_CONTROLS))
def test_good_server_certificate_is_accepted(dataplane_kind, name, planes):
    port, apps = planes.client_side(dataplane_kind)
    outcome = request_through_client_sidecar(port, f"/{name}/x")
    record(
        "server", f"(control) {name}", dataplane_kind, "accepted" if outcome == "200" else outcome
    )
    assert outcome == "200"
    assert apps[name].wait_quiet().requests >= 1


@pytest.mark.parametrize("name", [d.name for d in SERVER_DEFECTS.values() if d.presentable])
def test_bad_server_certificate_gets_no_request(dataplane_kind, name, planes, request):
    expect_envoy_quirk(request, dataplane_kind, "server", name)
    port, apps = planes.client_side(dataplane_kind)
    counted = RefusalReasons(planes, dataplane_kind, "client")
    outcome = request_through_client_sidecar(port, f"/{name}/x")
    counts = apps[name].wait_quiet()
    reasons = counted.new()
    record(
        "server",
        name,
        dataplane_kind,
        (outcome if counts.bytes == 0 else f"ACCEPTED ({outcome}, {counts.bytes} B to the server)")
        + (f" [{','.join(sorted(reasons))}]" if reasons else ""),
    )
    assert outcome.startswith("refused"), f"{SERVER_DEFECTS[name].why}: answered {outcome}"
    # Not one decrypted byte: the client sidecar aborted the handshake before sending its request.
    assert counts.bytes == 0 and counts.requests == 0
    check_reason(dataplane_kind, name, reasons)


# --- a certificate whose key does not match cannot even be configured ---------------------


@pytest.mark.parametrize("role", ["client", "server"])
def test_certificate_with_someone_elses_key_is_refused_at_load(
    dataplane_kind, role, planes, certs_dir, tmp_path
):
    defect = (CLIENT_DEFECTS if role == "client" else SERVER_DEFECTS)["key-does-not-match"]
    cert, key = defect.issued.write(certs_dir, f"mismatched-{role}")
    files = TlsFiles(cert, key, certs_dir / "trust-ca.pem", certs_dir / "trust-crl.pem")
    app = CountingApp()
    try:
        listen = free_port()
        if role == "client":
            config = client_sidecar(
                listen, [MeshUpstream("peer", "/", free_port(), SERVER_ID)], files
            )
        else:
            config = server_sidecar(listen, app.port, files, san_matchers=[{"exact": CLIENT_ID}])
        try:
            process = start_dataplane(dataplane_kind, config, tmp_path, timeout=20)
        except RuntimeError as error:
            reason = str(error).splitlines()[-1]
            # Refused for this reason, not because TLS settings are unsupported altogether.
            named = "key" in reason.lower() and "not supported" not in reason
            outcome = "refused at load" if named else f"refused for another reason: {reason[-80:]}"
        else:
            process.stop()
            outcome = "ACCEPTED the configuration"
        record(role, "key-does-not-match", dataplane_kind, outcome)
        assert outcome == "refused at load", outcome
    finally:
        app.stop()


def test_inline_certificates_work_like_files(dataplane_kind, certs_dir, tmp_path):
    """The same server sidecar with its certificate, key, roots and CRLs given as inline strings."""
    app = CountingApp()
    try:
        port = free_port()
        config = server_sidecar(
            port,
            app.port,
            trust_files(certs_dir, "server-sidecar"),
            san_matchers=[{"exact": CLIENT_ID}],
            inline=True,
        )
        process = start_dataplane(dataplane_kind, config, tmp_path)
        try:
            good = request_with_client_cert(
                port, CLIENT_CONTROLS["good-ec-from-root"], certs_dir, "inline-good"
            )
            revoked = request_with_client_cert(
                port, CLIENT_DEFECTS["revoked"].issued, certs_dir, "inline-revoked"
            )
        finally:
            process.stop()
        assert good == "200"
        assert revoked.startswith("refused"), revoked  # the inline CRL is read too
        assert app.wait_quiet().requests == 1
    finally:
        app.stop()
