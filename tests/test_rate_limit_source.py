"""A RateLimit that names its callers (sourcePrincipals, sourceNamespaces) limits only them: the callee's
inbound listener as the compiler makes it, with mTLS from a test CA, run by Envoy 1.40 and by meshctl,
called by meshctl sidecars of several identities. Plaintext callers, and one forging the header that
carries the peer's identity, match no source rule."""

from __future__ import annotations

from pathlib import Path

from helpers.dataplane import start_dataplane
from helpers.http_client import Http1Client
from helpers.pki import CertificateAuthority
from helpers.ports import free_port
from test_compiler_mtls_traffic import _static

from meshctl.control import resource_types as types
from meshctl.control.compiler import INBOUND_LISTENER, OUTBOUND_LISTENER, compile_mesh, sidecar_resources
from meshctl.control.registry import Sidecar

LIMIT = {
    "apiVersion": "policy.meshctl.io/v1alpha1", "kind": "RateLimit",
    "metadata": {"name": "reviews-callers", "namespace": "default"},
    "spec": {
        "selector": {"matchLabels": {"app": "reviews"}},
        "rules": [
            {"match": {"sourcePrincipals": ["cluster.local/ns/default/sa/productpage"]},
             "limit": {"requests": 2, "unit": "minute"}},
            {"match": {"sourceNamespaces": ["team-*"]}, "limit": {"requests": 1, "unit": "minute"}},
        ],
    },
}  # fmt: skip
HOST = "reviews.default.svc.cluster.local:9080"


def caller(name: str, namespace: str = "default") -> Sidecar:
    return Sidecar(node_id=f"{name}-1", service=name, namespace=namespace, outbound_port=free_port(),
                   identity=f"spiffe://cluster.local/ns/{namespace}/sa/{name}")  # fmt: skip


def statuses(port: int, count: int, headers: list[tuple[str, str]] = ()) -> list[int]:
    client = Http1Client(port)
    try:
        return [client.request("GET", "/", [("host", HOST), *headers]).status for _ in range(count)]
    finally:
        client.close()


def test_source_rules_limit_only_the_callers_they_name(dataplane_kind: str, tmp_path: Path, echo_a):
    ca = CertificateAuthority.root()
    reviews = Sidecar(
        node_id="reviews-v1", service="reviews", version="v1", service_port=9080, app_port=echo_a.port,
        inbound_port=free_port(), outbound_port=free_port(), ready=True,
        identity="spiffe://cluster.local/ns/default/sa/reviews",
    )  # fmt: skip
    productpage, ratings, auditor = caller("productpage"), caller("ratings"), caller("auditor", "team-a")
    mesh = compile_mesh([LIMIT], [reviews, productpage, ratings, auditor])
    started = []
    try:
        for kind, sidecar, only in ((dataplane_kind, reviews, INBOUND_LISTENER), ("meshctl", productpage, OUTBOUND_LISTENER),
                                    ("meshctl", ratings, OUTBOUND_LISTENER), ("meshctl", auditor, OUTBOUND_LISTENER)):  # fmt: skip
            compiled = sidecar_resources(mesh, sidecar)
            compiled[types.LISTENER] = [x for x in compiled[types.LISTENER] if x["name"] == only]
            directory = tmp_path / sidecar.node_id
            directory.mkdir()
            started.append(start_dataplane(kind, _static(compiled, sidecar, ca), directory))

        seen = {
            "productpage": statuses(productpage.outbound_port, 4),
            "ratings": statuses(ratings.outbound_port, 4),
            "team-a auditor": statuses(auditor.outbound_port, 3),
            # Plaintext to the inbound port (PERMISSIVE), claiming productpage's identity in the
            # header the rule reads: the callee replaces it, so no source rule counts these.
            "plaintext forging XFCC": statuses(reviews.inbound_port, 4, [
                ("x-forwarded-client-cert", "By=x;URI=spiffe://cluster.local/ns/default/sa/productpage")]),
        }  # fmt: skip
        print(f"{dataplane_kind}: {seen}")
        assert seen == {
            "productpage": [200, 200, 429, 429],
            "ratings": [200] * 4,
            "team-a auditor": [200, 429, 429],
            "plaintext forging XFCC": [200] * 4,
        }
    finally:
        for process in started:
            process.stop()
