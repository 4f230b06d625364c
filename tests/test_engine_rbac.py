"""Authorization on a normalized path: a DENY `/admin*` policy and an ALLOW-by-header policy in front
of a real app, probed with raw request lines nothing normalizes on the way.

The same static bootstrap runs on meshctl and on Envoy 1.40. Both must show 0 bypasses (no request
whose path is under /admin reaches the app) and the app must receive exactly the normalized path the
policy judged. Where Envoy's answer differs from meshctl's, the difference is listed in
ENVOY_DIFFERENCES (a deliberate meshctl choice or an Envoy quirk), so a new one fails the test.
A second table runs over real mTLS: the ALLOW policies match the client certificate's SPIFFE ID.
"""

from __future__ import annotations

import json
import posixpath
import re
import socket
import ssl
import subprocess
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest
from helpers import bootstrap as b
from helpers.mtls_bootstrap import TlsFiles, downstream_tls_socket
from helpers.pki import CertificateAuthority, write_trust
from helpers.ports import free_port

RBAC_TYPE = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
DENY_POLICY = "ns[default]-policy[deny-admin]-rule[0]"
TRUSTED = {"x-caller": "trusted"}


@dataclass(frozen=True)
class Case:
    target: str
    status: int
    # The path and query the app must receive (only for 200).
    forwarded: str | None = None
    headers: tuple[tuple[str, str], ...] = tuple(TRUSTED.items())
    method: str = "GET"


def ok(target: str, forwarded: str | None = None, **kw) -> Case:
    return Case(target, 200, forwarded if forwarded is not None else target, **kw)


def denied(target: str, **kw) -> Case:
    return Case(target, 403, **kw)


def bad(target: str, **kw) -> Case:
    return Case(target, 400, **kw)


ANONYMOUS: tuple[tuple[str, str], ...] = ()

CASES: list[Case] = [
    # The DENY policy, reached by every spelling of /admin.
    denied("/admin"),
    denied("//admin"),
    denied("///admin"),
    denied("/admin/"),
    denied("/%61dmin"),
    denied("/ad%6Din"),
    denied("/adm%69n/"),
    denied("/admin;x"),
    denied("/a/../admin"),
    denied("/a/b/../../admin/x"),
    denied("/./admin"),
    denied("/./../admin"),
    denied("/a/%2e%2e/admin"),
    denied("/%2e%2e/admin"),
    denied("/%2E/admin"),
    denied("/PUBLIC/../admin"),
    denied("/admin?x=/../y"),
    denied("/admin.html"),
    denied("/administrator"),
    denied("/admin%252F"),
    denied("/admin", headers=ANONYMOUS),
    denied("http://svc/admin"),
    denied("http://svc//admin"),
    denied("/admin", method="POST"),
    denied("/a\\..\\admin"),  # a raw backslash is a separator, as in Envoy
    denied("/admin#frag"),
    # Refused before any policy runs.
    bad("/admin%2Fx"),
    bad("/admin%2fx"),
    bad("/admin%5Cx"),
    bad("/admin%5cx"),
    bad("/%61dmin/..%2F"),
    bad("/public%2Fadmin"),
    bad("/%00"),
    bad("/admin%00"),
    bad("/public%00.html"),
    # Allowed (by the header policy) and forwarded normalized.
    ok("/public"),
    ok("/ADMIN"),
    ok("/%41DMIN", "/ADMIN"),
    ok("/%2561dmin"),  # decoded once only: the app sees %2561, not /admin
    ok("/..", "/"),
    ok("/admin/..", "/"),
    ok("/public/..", "/"),
    ok("/public//x", "/public/x"),
    ok("/public/./x", "/public/x"),
    ok("/public/a/../b", "/public/b"),
    ok("/public/%7e", "/public/~"),
    ok("/public%20x"),
    ok("/public?x=/../admin"),
    ok("/?q=//admin"),
    # `..;` is a dot segment (as in Envoy): servlet containers would read these as /admin.
    denied("/x/..;/admin"),
    denied("/x/%2e%2e;/admin"),
    ok("/x/..;x/public", "/public"),
    ok("/x/.;a=b/public", "/x/public"),
    ok("/x/...;/public"),
    ok("/public", method="POST"),
    ok("/public/%7b", "/public/%7B"),
    ok("/public\\x", "/public/x"),
    ok("/public%01"),  # only NUL is refused among escaped control characters, as in Envoy
    ok("/public#frag", "/public"),  # the fragment is dropped before anything judges the path
    # The ALLOW filter: no matching policy, denied (the `authenticated` policy never matches plaintext).
    denied("/public", headers=ANONYMOUS),
    denied("/public", headers=(("x-caller", "untrusted"),)),
]

# Case target → (status, forwarded) Envoy 1.40 gives where meshctl deliberately differs.
ENVOY_DIFFERENCES: dict[str, tuple[int, str | None]] = {
    # Envoy keeps the hex case of escapes it does not decode; meshctl upper-cases it (RFC 3986 §6.2.2.1).
    "/public/%7b": (200, "/public/%7b"),
    # Envoy treats a raw `..;` as `..` but not an escaped `%2e%2e;`: it forwards `/x/..;/admin`, which a
    # servlet container reads as /admin. meshctl treats both alike and denies.
    "/x/%2e%2e;/admin": (200, "/x/..;/admin"),
    # Envoy refuses a fragment in the request target; meshctl's HTTP parser drops it (the policy and
    # the app both see the path without it).
    "/admin#frag": (400, None),
    "/public#frag": (400, None),
}


class RecordingApp:
    """A small real HTTP/1.1 app that records the raw request target of every request it gets."""

    def __init__(self) -> None:
        received: list[tuple[str, str]] = []
        self.received = received

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_any(self) -> None:
                # The raw request line: BaseHTTPRequestHandler itself rewrites a leading `//`.
                target = self.raw_requestline.decode("latin-1").split(" ")[1]
                received.append((self.headers.get("x-case", ""), target))
                length = int(self.headers.get("content-length") or 0)
                if length:
                    self.rfile.read(length)
                body = json.dumps({"target": target}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_any

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def app():
    recording = RecordingApp()
    yield recording
    recording.close()


def rbac_filter(action: str, policies: dict) -> dict:
    return {"name": "envoy.filters.http.rbac", "typed_config": {"@type": RBAC_TYPE, "rules": {"action": action, "policies": policies}}}


def rbac_bootstrap(port: int, app_port: int, admin_port: int) -> dict:
    deny = rbac_filter("DENY", {
        DENY_POLICY: {"permissions": [{"url_path": {"path": {"prefix": "/admin"}}}], "principals": [{"any": True}]},
    })
    allow = rbac_filter("ALLOW", {
        "ns[default]-policy[allow-header]-rule[0]": {
            "permissions": [{"any": True}],
            "principals": [{"header": {"name": "x-caller", "string_match": {"exact": "trusted"}}}],
        },
        "ns[default]-policy[allow-principal]-rule[0]": {
            "permissions": [{"any": True}],
            "principals": [{"authenticated": {"principal_name": {"exact": "spiffe://cluster.local/ns/default/sa/trusted"}}}],
        },
    })
    routes = b.route_configuration("local", [b.virtual_host("all", [b.route("app")])])
    manager = b.http_connection_manager(
        routes,
        normalize_path=True,
        merge_slashes=True,
        path_with_escaped_slashes_action="REJECT_REQUEST",
    )
    manager["typed_config"]["http_filters"] = [deny, allow, *manager["typed_config"]["http_filters"]]
    config = b.bootstrap([b.listener("inbound", port, [{"filters": [manager]}])], [b.cluster("app", app_port)])
    config["admin"] = {"address": b.socket_address(admin_port)}
    return config


def send_raw(port: int, case: Case, case_id: int) -> tuple[int, bytes]:
    """One request on its own connection, written byte for byte; returns (status, body)."""
    headers = "".join(f"{name}: {value}\r\n" for name, value in case.headers)
    body = b"x" if case.method == "POST" else b""
    length = f"content-length: {len(body)}\r\n" if case.method == "POST" else ""
    head = f"{case.method} {case.target} HTTP/1.1\r\nhost: svc\r\nx-case: {case_id}\r\n{headers}{length}connection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.encode("latin-1") + body)
        response = b""
        # Read the head and a content-length body, not until close (Envoy delays closing by 1 s).
        while b"\r\n\r\n" not in response and (chunk := sock.recv(65536)):
            response += chunk
        response_head, _, response_body = response.partition(b"\r\n\r\n")
        length = re.search(rb"(?im)^content-length:\s*(\d+)", response_head)
        while length and len(response_body) < int(length.group(1)) and (chunk := sock.recv(65536)):
            response_body += chunk
    match = re.match(rb"HTTP/1\.1 (\d{3})", response_head)
    assert match, f"{case.target!r}: no HTTP response: {response[:200]!r}"
    return int(match.group(1)), response_body


def under_admin(path_and_query: str) -> bool:
    """Whether an app that decodes a path once, reads `\\` as `/` and drops `;parameters` from
    segments (as servlet containers do) would serve it as /admin."""
    if "://" in path_and_query:
        return True  # an absolute-form target must never reach the app
    path = unquote(path_and_query.split("?", 1)[0]).replace("\\", "/")
    segments = [segment.split(";", 1)[0] for segment in path.split("/")]
    return posixpath.normpath("/" + "/".join(segments).lstrip("/")).startswith("/admin")


def run_table(kind: str, dataplane, app: RecordingApp) -> tuple[dict[int, tuple[int, bytes]], str]:
    port, admin_port = free_port(), free_port()
    dataplane(rbac_bootstrap(port, app.port, admin_port))
    observed = {i: send_raw(port, case, i) for i, case in enumerate(CASES)}
    stats = subprocess.run(
        ["curl", "-sS", f"http://127.0.0.1:{admin_port}/stats/prometheus"], capture_output=True, text=True, timeout=20, check=True
    ).stdout
    return observed, stats


def test_table_is_large_enough():
    assert len(CASES) >= 40
    assert len({(c.target, c.headers, c.method) for c in CASES}) == len(CASES)


def test_rbac_on_normalized_paths(dataplane_kind, dataplane, app):
    observed, stats = run_table(dataplane_kind, dataplane, app)
    received = {int(case_id): target for case_id, target in app.received}
    assert len(received) == len(app.received), "one app request per case at most"

    known = ENVOY_DIFFERENCES if dataplane_kind == "envoy" else {}
    bypasses = [
        f"case {i} {CASES[i].target!r} reached the app as {target!r}"
        for i, target in received.items()
        if under_admin(target) and CASES[i].target not in known
    ]
    assert not bypasses, "\n".join(bypasses)

    report = []
    for i, case in enumerate(CASES):
        status, body = observed[i]
        expected = (case.status, case.forwarded)
        if dataplane_kind == "envoy" and case.target in ENVOY_DIFFERENCES:
            expected = ENVOY_DIFFERENCES[case.target]
        got = (status, received.get(i))
        if got != expected:
            report.append(f"{case.method} {case.target!r} {dict(case.headers)}: expected {expected}, got {got}")
        if status == 403:
            assert body == b"RBAC: access denied", (case.target, body)
        if status != 200:
            assert i not in received, f"{case.target!r} was answered {status} but reached the app"
    assert not report, f"{dataplane_kind}:\n" + "\n".join(report)

    if dataplane_kind == "meshctl":
        denied_by_deny = sum(1 for c in CASES if c.status == 403 and c.forwarded is None and under_admin_judged(c))
        denied_by_allow = sum(1 for c in CASES if c.status == 403) - denied_by_deny
        allowed = sum(1 for c in CASES if c.status == 200)
        assert f'meshctl_rbac_denied_total{{action="DENY",policy="{DENY_POLICY}"}} {denied_by_deny}' in stats, stats
        assert f'meshctl_rbac_denied_total{{action="ALLOW",policy=""}} {denied_by_allow}' in stats, stats
        assert f"meshctl_rbac_allowed_total {allowed}" in stats, stats


def under_admin_judged(case: Case) -> bool:
    """Whether the DENY policy (not the ALLOW one) refuses this 403 case."""
    target = case.target.split("://", 1)[1].split("/", 1)[1] if "://" in case.target else case.target.lstrip("/")
    return under_admin("/" + target)


# --- ALLOW by the peer's verified SPIFFE ID, over real mTLS ------------------------------------------

def spiffe(namespace: str, service_account: str) -> str:
    return f"spiffe://cluster.local/ns/{namespace}/sa/{service_account}"


def mtls_bootstrap(port: int, app_port: int, admin_port: int, server: TlsFiles) -> dict:
    """The inbound shape of the contract: mTLS chain, hardened HCM, DENY /admin then ALLOW by principal."""
    deny = rbac_filter("DENY", {
        DENY_POLICY: {"permissions": [{"url_path": {"path": {"prefix": "/admin"}}}], "principals": [{"any": True}]},
    })
    allow = rbac_filter("ALLOW", {
        "ns[default]-policy[frontend]-rule[0]": {
            "permissions": [{"header": {"name": ":method", "string_match": {"exact": "GET"}}}],
            "principals": [{"authenticated": {"principal_name": {"exact": spiffe("default", "frontend")}}}],
        },
        "ns[default]-policy[ops-namespace]-rule[0]": {
            "permissions": [{"any": True}],
            "principals": [{"authenticated": {"principal_name": {"safe_regex": {"regex": "spiffe://[^/]+/ns/ops/sa/[^/]+"}}}}],
        },
    })
    routes = b.route_configuration("local", [b.virtual_host("all", [b.route("app")])])
    manager = b.http_connection_manager(
        routes, normalize_path=True, merge_slashes=True, path_with_escaped_slashes_action="REJECT_REQUEST"
    )
    manager["typed_config"]["http_filters"] = [deny, allow, *manager["typed_config"]["http_filters"]]
    chain = {
        "filter_chain_match": {"transport_protocol": "tls"},
        "transport_socket": downstream_tls_socket(server, san_matchers=[{"prefix": "spiffe://cluster.local/"}]),
        "filters": [manager],
    }
    # Envoy picks a chain by transport_protocol only behind the TLS inspector.
    inspector = {"name": "envoy.filters.listener.tls_inspector", "typed_config": {"@type": b.TLS_INSPECTOR_TYPE}}
    inbound = b.listener("inbound", port, [chain], listener_filters=[inspector])
    config = b.bootstrap([inbound], [b.cluster("app", app_port)])
    config["admin"] = {"address": b.socket_address(admin_port)}
    return config


def send_mtls(port: int, ca: Path, client: tuple[Path, Path], method: str, target: str) -> int:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(ca)
    context.check_hostname = False  # the server is named by its SPIFFE URI SAN, not a host name
    context.load_cert_chain(*client)
    context.set_alpn_protocols(["http/1.1"])
    length = "content-length: 0\r\n" if method == "POST" else ""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, context.wrap_socket(raw) as sock:
        sock.sendall(f"{method} {target} HTTP/1.1\r\nhost: svc\r\n{length}connection: close\r\n\r\n".encode())
        response = b""
        while b"\r\n" not in response and (chunk := sock.recv(65536)):
            response += chunk
    match = re.match(rb"HTTP/1\.1 (\d{3})", response)
    assert match, response[:200]
    return int(match.group(1))


def test_allow_by_peer_principal_over_mtls(dataplane_kind, dataplane, app, tmp_path):
    ca = CertificateAuthority.root()
    trust = write_trust(tmp_path, [ca], [ca])
    server_cert, server_key = ca.workload(spiffe("default", "reviews")).write(tmp_path, "server")
    server = TlsFiles(server_cert, server_key, trust.ca, trust.crl)
    clients = {
        name: ca.workload(spiffe(namespace, account)).write(tmp_path, name)
        for name, (namespace, account) in {
            "frontend": ("default", "frontend"), "stranger": ("default", "stranger"), "ops": ("ops", "backup"),
        }.items()
    }  # fmt: skip
    port, admin_port = free_port(), free_port()
    dataplane(mtls_bootstrap(port, app.port, admin_port, server))
    table = [
        ("frontend", "GET", "/data", 200),
        ("frontend", "POST", "/data", 403),  # its policy allows GET only
        ("frontend", "GET", "//admin", 403),  # DENY comes first, whoever asks
        ("frontend", "GET", "/%61dmin", 403),
        ("stranger", "GET", "/data", 403),
        ("ops", "POST", "/data", 200),  # the namespace regex
        ("ops", "GET", "/a/../admin", 403),
    ]
    observed = [(who, method, target, send_mtls(port, trust.ca, clients[who], method, target)) for who, method, target, _ in table]
    assert observed == table
    assert sorted(target for _, target in app.received) == ["/data", "/data"]


def test_h2c_paths_are_normalized_and_judged_the_same(dataplane_kind, dataplane, app):
    """HTTP/2 carries the path in `:path`; curl --path-as-is sends it untouched."""
    port, admin_port = free_port(), free_port()
    dataplane(rbac_bootstrap(port, app.port, admin_port))
    table = [("//admin", 403), ("/%61dmin", 403), ("/a/../admin", 403), ("/admin%2Fx", 400), ("/public/./x", 200)]
    observed = []
    for target, _ in table:
        completed = subprocess.run(
            ["curl", "-sS", "--http2-prior-knowledge", "--path-as-is", "-o", "/dev/null", "-w", "%{http_code} %{http_version}",
             "-H", "x-caller: trusted", f"http://127.0.0.1:{port}{target}"],
            capture_output=True, text=True, timeout=20, check=True,
        )  # fmt: skip
        code, version = completed.stdout.split()
        assert version == "2", completed.stdout
        observed.append((target, int(code)))
    assert observed == table
    assert [target for _, target in app.received] == ["/public/x"]


# --- the other path settings, differentially against Envoy -------------------------------------------

MODE_TARGETS = [
    "/a%2Fb", "/a%2fb", "/a%5Cb", "/x/a%2F..%2Fadmin", "/admin%2Fx", "//a//b", "/a/../b", "/%61%2F",
    "/a%2F%2Fb", "/a/%2F/b", "/a%5c..%5cadmin", "/%2e%2e%2Fadmin", "/%61dmin", "/x/..;/admin",
]  # fmt: skip
MODES = {
    "keep-unchanged": {"path_with_escaped_slashes_action": "KEEP_UNCHANGED", "normalize_path": True, "merge_slashes": True},
    "unescape-and-forward": {"path_with_escaped_slashes_action": "UNESCAPE_AND_FORWARD", "normalize_path": True, "merge_slashes": True},
    "unescape-only": {"path_with_escaped_slashes_action": "UNESCAPE_AND_FORWARD", "normalize_path": False, "merge_slashes": False},
    "merge-only": {"path_with_escaped_slashes_action": "KEEP_UNCHANGED", "normalize_path": False, "merge_slashes": True},
}


def upper_hex(path: str | None) -> str | None:
    """meshctl writes the escapes it keeps with upper-case hex (RFC 3986 §6.2.2.1); Envoy keeps the case."""
    return None if path is None else re.sub(r"%[0-9a-fA-F]{2}", lambda m: m.group(0).upper(), path)


@pytest.mark.meshctl_only
@pytest.mark.parametrize("settings", MODES.values(), ids=MODES.keys())
def test_path_settings_match_envoy(settings, tmp_path):
    from helpers.dataplane import start_dataplane

    observed: dict[str, list] = {}
    for kind in ("envoy", "meshctl"):
        recording = RecordingApp()
        port, admin_port = free_port(), free_port()
        config = rbac_bootstrap(port, recording.port, admin_port)
        config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"].update(settings)
        directory = tmp_path / kind
        directory.mkdir()
        process = start_dataplane(kind, config, directory)
        try:
            statuses = [send_raw(port, Case(target, 0), i)[0] for i, target in enumerate(MODE_TARGETS)]
        finally:
            process.stop()
            recording.close()
        forwarded = dict(recording.received)
        observed[kind] = [(t, s, upper_hex(forwarded.get(str(i)))) for i, (t, s) in enumerate(zip(MODE_TARGETS, statuses))]
    differences = [f"{e} (envoy) != {m} (meshctl)" for e, m in zip(observed["envoy"], observed["meshctl"]) if e != m]
    assert not differences, "\n".join(differences)


# --- what the control plane compiles ------------------------------------------------------------------


@pytest.mark.meshctl_only
@pytest.mark.parametrize("case", ["permissive", "strict", "disable"])
def test_the_engine_decodes_the_compiled_rbac_filters(case):
    """The compiler's AuthorizationPolicy translation (every rule form it emits) is accepted by the
    engine, and its DENY/ALLOW filters and path settings are in force (seen in /config_dump)."""
    import test_compiler_envoy as compiled_security

    from meshctl import _core
    from meshctl.agent.bootstrap import bootstrap_from_dict
    from meshctl.control.compiler import compile_mesh, sidecar_resources

    resources, registry = compiled_security.CASES[case]
    document = compiled_security.bootstrap(
        sidecar_resources(compile_mesh(resources, registry), registry[0]), CertificateAuthority.root()
    )
    # No ADS here: EDS clusters go, RDS becomes an empty inline table, and nothing binds a real port.
    document.pop("dynamic_resources")
    static = document["static_resources"]
    static["clusters"] = [c for c in static["clusters"] if c.get("type") != "EDS"]
    for entry in static["listeners"]:
        entry["address"]["socket_address"]["port_value"] = 0
        for chain in entry["filter_chains"]:
            manager = chain["filters"][0]["typed_config"]
            if manager.pop("rds", None) is not None:
                manager["route_config"] = {"name": "empty", "virtual_hosts": []}
    engine = _core.Engine(bootstrap_from_dict(document), worker_threads=1)
    try:
        dump = json.loads(engine.config_dump())
        stats = engine.stats_prometheus()
    finally:
        engine.stop()
    inbound = next(entry["config"] for entry in dump["listeners"] if entry["config"]["name"] == "virtualInbound")
    managers = [chain["handler"] for chain in inbound["filter_chains"] if chain["handler"]["kind"] == "http"]
    assert managers
    for manager in managers:
        assert [f["action"] for f in manager["rbac"]["filters"]] == ["DENY", "ALLOW"]
        assert manager["path_normalization"] == {"normalize": True, "merge_slashes": True, "escaped_slashes": "REJECT_REQUEST"}
    assert 'meshctl_rbac_denied_total{action="DENY",policy="ns[istio-system]-policy[deny-admin]-rule[0]"} 0' in stats
