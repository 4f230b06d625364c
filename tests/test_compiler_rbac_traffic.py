"""What a user sees from compiled AuthorizationPolicies: the inbound listener the compiler makes,
run by Envoy 1.40 and by meshctl from the same static bootstrap, answers the same requests the
same way (403 `RBAC: access denied`, 400 for escaped slashes) and forwards the path it judged."""

from __future__ import annotations

import pytest
from helpers.http_client import Http1Client

from meshctl.control import resource_types as types
from meshctl.control.compiler import INBOUND_LISTENER, compile_mesh, sidecar_resources
from meshctl.control.registry import Sidecar


def security(kind: str, name: str, spec: dict, namespace: str = "default") -> dict:
    return {"apiVersion": "security.istio.io/v1", "kind": kind,
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}  # fmt: skip


POLICIES = [
    # Mesh-wide (root namespace): nobody reaches /admin...
    security("AuthorizationPolicy", "no-admin", {
        "action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}],
    }, namespace="istio-system"),
    security("AuthorizationPolicy", "blocked-header", {
        "action": "DENY", "rules": [{"when": [{"key": "request.headers[X-Blocked]", "values": ["*"]}]}],
    }),
    # ...and once an ALLOW policy selects the workload, only what some rule allows gets through.
    security("AuthorizationPolicy", "reviews", {
        "selector": {"matchLabels": {"app": "reviews"}},
        "rules": [
            {"to": [{"operation": {"methods": ["GET"], "paths": ["/public/*", "/health"]}}]},
            {"when": [{"key": "request.headers[x-user]", "values": ["alice", "bo*"], "notValues": ["bob-evil"]}]},
            # The service port, as a policy names it; on the wire it is the inbound port.
            {"to": [{"operation": {"ports": ["9080"], "methods": ["POST"], "paths": ["/submit"]}}]},
        ],
    }),
]  # fmt: skip

DENIED = (403, b"RBAC: access denied")
# (method, target, headers) → (status, the path the app received, or the 403/400 body)
CASES = [
    ("GET", "/public/a", [], (200, "/public/a")),
    ("GET", "/health", [], (200, "/health")),
    ("GET", "/healthz", [], DENIED),  # no ALLOW rule matches
    ("POST", "/public/a", [], DENIED),
    ("POST", "/submit", [], (200, "/submit")),
    ("POST", "/submit/x", [], DENIED),
    ("GET", "/admin", [], DENIED),
    ("GET", "/admin", [("x-user", "alice")], DENIED),  # DENY is evaluated first
    ("GET", "//admin", [("x-user", "alice")], DENIED),  # merged slashes
    ("GET", "/public/../admin/x", [], DENIED),  # dot segments resolved before the policy
    ("GET", "/ADMIN", [("x-user", "alice")], (200, "/ADMIN")),  # paths are case-sensitive
    ("GET", "/public/./a/../b", [], (200, "/public/b")),  # the app gets the path that was judged
    ("GET", "/public//a", [], (200, "/public/a")),
    ("GET", "/other", [("x-user", "bob")], (200, "/other")),
    ("GET", "/other", [("x-user", "bob-evil")], DENIED),
    ("GET", "/other", [("x-user", "carol")], DENIED),
    ("GET", "/public/a", [("x-blocked", "1")], DENIED),
    ("GET", "/admin%2Fx", [("x-user", "alice")], 400),  # escaped slashes refused
    ("GET", "/public/a%5cb", [], 400),
    ("GET", "/%61dmin", [("x-user", "alice")], DENIED),  # unreserved characters decoded first
]


@pytest.fixture
def inbound_bootstrap(port: int, echo_a) -> dict:
    instance = Sidecar(
        node_id="reviews-v1", service="reviews", version="v1", service_port=9080,
        app_port=echo_a.port, inbound_port=port, ready=True,
    )  # fmt: skip
    compiled = sidecar_resources(compile_mesh(POLICIES, [instance]), instance)
    listeners = [listener for listener in compiled[types.LISTENER] if listener["name"] == INBOUND_LISTENER]
    local = [cluster for cluster in compiled[types.CLUSTER] if cluster["name"].startswith("inbound|")]
    return {"static_resources": {"listeners": listeners, "clusters": local}}


def test_compiled_policies_decide_the_same_on_envoy_and_meshctl(dataplane, inbound_bootstrap, port):
    dataplane(inbound_bootstrap)
    client = Http1Client(port)
    seen = []
    for method, target, headers, expected in CASES:
        response = client.request(method, target, headers + [("x-forwarded-client-cert", "By=spoofed")])
        if isinstance(expected, int):
            seen.append((method, target, response.status))
            continue
        status, _ = expected
        if status == 200:
            assert response.status == 200, (method, target, response.status, response.body)
            echoed = response.json()
            # Any XFCC a caller sends is removed (SANITIZE_SET); a plaintext peer adds none.
            assert "x-forwarded-client-cert" not in echoed["headers"]
            seen.append((method, target, response.status, echoed["path"]))
        else:
            seen.append((method, target, response.status, response.body))
    client.close()
    wanted = [
        (m, t, e) if isinstance(e, int) else (m, t, *e) for m, t, _, e in CASES
    ]
    assert seen == wanted
