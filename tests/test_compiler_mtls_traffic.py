"""The compiler's mTLS output carries traffic: a client sidecar and a server sidecar made from
compiled clusters, routes and listeners (EDS/RDS inlined, SDS secrets given statically from a
test CA) talk mTLS over h2 on Envoy 1.40 and on meshctl, in every pairing. The server's STRICT
PeerAuthentication refuses plaintext, its AuthorizationPolicy admits one principal, and the app
sees Envoy's x-forwarded-client-cert."""

from __future__ import annotations

import base64
import socket
from pathlib import Path
from typing import Any

import pytest
from helpers.dataplane import start_dataplane
from helpers.http_client import Http1Client
from helpers.pki import CertificateAuthority, key_pem, pem
from helpers.ports import free_port

from meshctl.control import resource_types as types
from meshctl.control.compiler import (
    INBOUND_LISTENER,
    OUTBOUND_LISTENER,
    compile_mesh,
    sidecar_resources,
)
from meshctl.control.registry import Sidecar

SERVER_ID = "spiffe://cluster.local/ns/default/sa/reviews"
ALLOWED_ID = "spiffe://cluster.local/ns/default/sa/productpage"
OTHER_ID = "spiffe://cluster.local/ns/default/sa/ratings"
RESOURCES = [
    {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
     "metadata": {"name": "default", "namespace": "istio-system"}, "spec": {"mtls": {"mode": "STRICT"}}},
    {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
     "metadata": {"name": "reviews", "namespace": "default"},
     "spec": {"selector": {"matchLabels": {"app": "reviews"}},
              "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/default/sa/productpage"]}}]}]}},
]  # fmt: skip


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _without_sds_sources(node: Any) -> Any:
    """SDS references by name alone: the data plane then takes its static secret of that name."""
    if isinstance(node, dict):
        return {k: _without_sds_sources(v) for k, v in node.items() if k != "sds_config"}
    if isinstance(node, list):
        return [_without_sds_sources(v) for v in node]
    return node


def _secrets(ca: CertificateAuthority, identity: str) -> list[dict]:
    workload = ca.workload(identity)
    return [
        {"name": "default", "tls_certificate": {
            "certificate_chain": {"inline_bytes": _b64(workload.chain_pem())},
            "private_key": {"inline_bytes": _b64(key_pem(workload.key))}}},
        {"name": "ROOTCA", "validation_context": {
            "trusted_ca": {"inline_bytes": _b64(pem([ca.cert]))},
            "crl": {"inline_bytes": _b64(ca.crl_pem())}}},
    ]  # fmt: skip


def _static(compiled: dict[str, list[dict]], sidecar: Sidecar, ca: CertificateAuthority) -> dict:
    """One sidecar's compiled resources as a static bootstrap: EDS clusters become STATIC with
    their assignment, the outbound listener's RDS table is inlined."""
    assignments = {a["cluster_name"]: a for a in compiled[types.ENDPOINT]}
    clusters = []
    for cluster in compiled[types.CLUSTER]:
        if cluster.get("type") == "EDS":
            cluster = {k: v for k, v in cluster.items() if k != "eds_cluster_config"}
            cluster.update(type="STATIC", load_assignment=assignments[cluster["name"]])
        clusters.append(cluster)
    (routes,) = compiled[types.ROUTE]
    listeners = []
    for listener in compiled[types.LISTENER]:
        if listener["name"] == OUTBOUND_LISTENER:
            manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
            manager = {k: v for k, v in manager.items() if k != "rds"} | {"route_config": routes}
            listener["filter_chains"][0]["filters"][0]["typed_config"] = manager
        listeners.append(listener)
    return {
        "node": {"id": sidecar.node_id, "cluster": sidecar.service},
        "static_resources": _without_sds_sources(
            {"listeners": listeners, "clusters": clusters, "secrets": _secrets(ca, sidecar.identity or "")}
        ),
    }


PAIRS = [("envoy", "envoy"), ("meshctl", "meshctl"), ("envoy", "meshctl"), ("meshctl", "envoy")]


@pytest.mark.parametrize("client_kind, server_kind", PAIRS, ids=[f"{c}-to-{s}" for c, s in PAIRS])
def test_compiled_mtls_between_sidecars(tmp_path: Path, echo_a, client_kind: str, server_kind: str):
    ca = CertificateAuthority.root()
    server = Sidecar(
        node_id="reviews-v1", service="reviews", version="v1", service_port=9080, app_port=echo_a.port,
        inbound_port=free_port(), outbound_port=free_port(), ready=True, identity=SERVER_ID,
    )  # fmt: skip
    allowed = Sidecar(node_id="productpage-1", service="productpage", outbound_port=free_port(), identity=ALLOWED_ID)
    other = Sidecar(node_id="ratings-1", service="ratings", outbound_port=free_port(), identity=OTHER_ID)
    mesh = compile_mesh(RESOURCES, [server, allowed, other])
    started = []
    try:
        for kind, sidecar, only in ((server_kind, server, INBOUND_LISTENER), (client_kind, allowed, OUTBOUND_LISTENER),
                                    (client_kind, other, OUTBOUND_LISTENER)):  # fmt: skip
            compiled = sidecar_resources(mesh, sidecar)
            compiled[types.LISTENER] = [x for x in compiled[types.LISTENER] if x["name"] == only]
            directory = tmp_path / sidecar.node_id
            directory.mkdir()
            started.append(start_dataplane(kind, _static(compiled, sidecar, ca), directory))

        client = Http1Client(allowed.outbound_port)
        response = client.request("GET", "/hello", [("host", "reviews:9080")])
        assert response.status == 200, (response.status, response.body)
        echoed = response.json()
        assert echoed["path"] == "/hello"
        xfcc = echoed["headers"]["x-forwarded-client-cert"]
        assert xfcc.startswith(f"By={SERVER_ID};Hash=") and xfcc.endswith(f";URI={ALLOWED_ID}"), xfcc
        client.close()

        client = Http1Client(other.outbound_port)
        response = client.request("GET", "/hello", [("host", "reviews:9080")])
        assert (response.status, response.body) == (403, b"RBAC: access denied")
        client.close()

        # STRICT: a plaintext request to the server's inbound port gets no answer.
        with socket.create_connection(("127.0.0.1", server.inbound_port), timeout=5) as raw:
            raw.sendall(b"GET /hello HTTP/1.1\r\nhost: reviews\r\n\r\n")
            try:
                answer = raw.recv(100)
            except (ConnectionResetError, TimeoutError):
                answer = b""
        assert answer == b"", answer
    finally:
        for process in started:
            process.stop()
            print(f"--- {process.name} log ---\n{process.log()}")
