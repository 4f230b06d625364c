"""Auto mTLS and PeerAuthentication: each workload's mTLS mode, and the TLS contexts of clusters and inbound chains.

Shapes are the ones in issue 4's contract (Istio's): certificates by SDS name, `default` (the
workload's chain and key) and `ROOTCA` (the trust bundle), both delivered over ADS.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from meshctl.resources.security_common import scope_levels

Json = dict[str, Any]

UPSTREAM_TLS_TYPE = (
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
)
DOWNSTREAM_TLS_TYPE = (
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
)
TLS_INSPECTOR_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"
)
WORKLOAD_SECRET = "default"
ROOT_SECRET = "ROOTCA"
SIDECAR_ALPN = "h2"  # sidecar to sidecar is HTTP/2 whatever the app speaks
INBOUND_ALPN = ["h2", "http/1.1"]

DISABLE, PERMISSIVE, STRICT = "DISABLE", "PERMISSIVE", "STRICT"


def effective_mode(
    policies: Sequence[Any], namespace: str, labels: Mapping[str, str], port: int | None
) -> str:
    """Istio's precedence: the oldest workload policy (its port-level mode for `port` first), else
    the namespace's, else the mesh's (the root namespace's, no selector); UNSET defers to the
    wider one; nothing set means PERMISSIVE. `policies` are stored PeerAuthentications, oldest
    first (anything with .namespace and .spec)."""
    mesh, namespace_wide, workload = scope_levels(policies, namespace, labels, lambda policy: policy.spec)
    mode = PERMISSIVE
    for level in (mesh, namespace_wide, workload):
        if level is not None and level.mtls is not None and level.mtls.mode != "UNSET":
            mode = level.mtls.mode
    if workload is not None and port is not None:
        per_port = (workload.port_level_mtls or {}).get(port)
        if per_port is not None and per_port.mode != "UNSET":
            mode = per_port.mode
    return mode


def sds(name: str) -> Json:
    return {"name": name, "sds_config": {"ads": {}, "resource_api_version": "V3"}}


def sni(port: int, subset: str | None, host: str) -> str:
    """Istio's SNI for a mesh cluster: outbound_.9080_.v1_.reviews.default.svc.cluster.local."""
    return f"outbound_.{port}_.{subset or ''}_.{host}"


def upstream_tls(server_name: str, identities: Iterable[str]) -> Json:
    """The transport socket of a cluster whose instances all have identities: the peer must
    present one of them (SAN URI, OR'ed)."""
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": UPSTREAM_TLS_TYPE,
            "sni": server_name,
            "common_tls_context": {
                "alpn_protocols": [SIDECAR_ALPN],
                "tls_certificate_sds_secret_configs": [sds(WORKLOAD_SECRET)],
                "combined_validation_context": {
                    "default_validation_context": {
                        "match_typed_subject_alt_names": [
                            {"san_type": "URI", "matcher": {"exact": identity}}
                            for identity in sorted(set(identities))
                        ]
                    },
                    "validation_context_sds_secret_config": sds(ROOT_SECRET),
                },
            },
        },
    }


def trust_domain(identity: str) -> str:
    """spiffe://cluster.local/ns/a/sa/b → cluster.local."""
    return identity.removeprefix("spiffe://").split("/", 1)[0]


def downstream_tls(identity: str) -> Json:
    """The inbound TLS chain's transport socket: a client certificate from the sidecar's own
    trust domain is required (which peer may do what is the RBAC filters' business)."""
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": DOWNSTREAM_TLS_TYPE,
            "require_client_certificate": True,
            "common_tls_context": {
                "alpn_protocols": list(INBOUND_ALPN),
                "tls_certificate_sds_secret_configs": [sds(WORKLOAD_SECRET)],
                "combined_validation_context": {
                    "default_validation_context": {
                        "match_typed_subject_alt_names": [
                            {
                                "san_type": "URI",
                                "matcher": {"prefix": f"spiffe://{trust_domain(identity)}/"},
                            }
                        ]
                    },
                    "validation_context_sds_secret_config": sds(ROOT_SECRET),
                },
            },
        },
    }


def inbound_chains(manager: Json, identity: str | None, mode: str) -> tuple[list[Json], list[Json]]:
    """(filter chains, listener filters) of an inbound listener whose HCM is `manager`.

    With an identity: a TLS chain, plus a plaintext one unless STRICT; DISABLE is plaintext
    only. Without one: plaintext only, or nothing under STRICT (callers are refused: the
    listener is left out, since a listener needs a chain). A lone plaintext chain has no match,
    exactly as before mTLS."""
    filters = [manager]
    if identity is None and mode == STRICT:
        return [], []
    if identity is None or mode == DISABLE:
        return [{"filters": filters}], []
    chains = [
        {
            "filter_chain_match": {"transport_protocol": "tls"},
            "transport_socket": downstream_tls(identity),
            "filters": filters,
        }
    ]
    if mode != STRICT:
        chains.append(
            {"filter_chain_match": {"transport_protocol": "raw_buffer"}, "filters": filters}
        )
    inspector = {
        "name": "envoy.filters.listener.tls_inspector",
        "typed_config": {"@type": TLS_INSPECTOR_TYPE},
    }
    return chains, [inspector]
