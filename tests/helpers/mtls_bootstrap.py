"""Static Envoy-style bootstraps for an mTLS sidecar pair (server: inbound mTLS → app; client: plain → mTLS h2), run unchanged by Envoy and meshctl."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import bootstrap as b

DOWNSTREAM_TLS_TYPE = (
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
)
UPSTREAM_TLS_TYPE = (
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
)
TLS_TRANSPORT_SOCKET = "envoy.transport_sockets.tls"


@dataclass(frozen=True)
class TlsFiles:
    """What one sidecar presents (cert chain + key) and what it verifies peers with (roots + CRLs)."""

    cert: Path
    key: Path
    ca: Path
    crl: Path | None = None


def _data_source(path: Path, inline: bool) -> b.Json:
    # Inline strings exercise the other way the contract allows certificates to be given.
    return {"inline_string": path.read_text()} if inline else {"filename": str(path)}


def _common_tls_context(
    files: TlsFiles, san_matchers: list[b.Json], alpn: list[str], inline: bool
) -> b.Json:
    validation: b.Json = {"trusted_ca": _data_source(files.ca, inline)}
    if files.crl is not None:
        validation["crl"] = _data_source(files.crl, inline)
    if san_matchers:
        validation["match_typed_subject_alt_names"] = [
            {"san_type": "URI", "matcher": matcher} for matcher in san_matchers
        ]
    return {
        "alpn_protocols": alpn,
        "tls_certificates": [
            {
                "certificate_chain": _data_source(files.cert, inline),
                "private_key": _data_source(files.key, inline),
            }
        ],
        "validation_context": validation,
    }


def downstream_tls_socket(
    files: TlsFiles, *, san_matchers: list[b.Json], inline: bool = False
) -> b.Json:
    """The inbound side: client certificate required and verified against `san_matchers` (OR)."""
    return {
        "name": TLS_TRANSPORT_SOCKET,
        "typed_config": {
            "@type": DOWNSTREAM_TLS_TYPE,
            "require_client_certificate": True,
            "common_tls_context": _common_tls_context(
                files, san_matchers, ["h2", "http/1.1"], inline
            ),
        },
    }


def upstream_tls_socket(
    files: TlsFiles, *, expected_sans: list[str], sni: str, inline: bool = False
) -> b.Json:
    """The outbound side: present our certificate, accept only a server whose URI SAN is one of `expected_sans`."""
    return {
        "name": TLS_TRANSPORT_SOCKET,
        "typed_config": {
            "@type": UPSTREAM_TLS_TYPE,
            "sni": sni,
            "common_tls_context": _common_tls_context(
                files, [{"exact": san} for san in expected_sans], ["h2"], inline
            ),
        },
    }


def server_sidecar(
    inbound_port: int,
    app_port: int,
    files: TlsFiles,
    *,
    san_matchers: list[b.Json],
    admin_port: int | None = None,
    inline: bool = False,
) -> b.Json:
    """Inbound listener: one TLS filter chain (STRICT: plaintext matches no chain) whose HCM sends to the app."""
    routes = b.route_configuration("inbound", [b.virtual_host("app", [b.route("inbound|app||")])])
    chain = {
        "filter_chain_match": {"transport_protocol": "tls"},
        "filters": [b.http_connection_manager(routes, stat_prefix="inbound")],
        "transport_socket": downstream_tls_socket(files, san_matchers=san_matchers, inline=inline),
    }
    inspector = {
        "name": "envoy.filters.listener.tls_inspector",
        "typed_config": {"@type": b.TLS_INSPECTOR_TYPE},
    }
    config = b.bootstrap(
        [b.listener("inbound", inbound_port, [chain], listener_filters=[inspector])],
        [b.cluster("inbound|app||", app_port)],
    )
    return _with_admin(config, admin_port)


@dataclass(frozen=True)
class MeshUpstream:
    """One destination of the client sidecar: requests under `prefix` go over mTLS h2 to `port`."""

    name: str
    prefix: str
    port: int
    expected_san: str
    sni: str = "outbound_.8080_._.server.default.svc.cluster.local"


def client_sidecar(
    listener_port: int,
    upstreams: list[MeshUpstream],
    files: TlsFiles,
    *,
    admin_port: int | None = None,
    inline: bool = False,
) -> b.Json:
    """Plain HTTP listener; each upstream is an h2 cluster with an UpstreamTlsContext pinning its SPIFFE ID."""
    routes = b.route_configuration(
        "outbound",
        [b.virtual_host("mesh", [b.route(up.name, prefix=up.prefix) for up in upstreams])],
    )
    clusters = []
    for up in upstreams:
        cluster = b.cluster(up.name, up.port, http2=True)
        cluster["transport_socket"] = upstream_tls_socket(
            files, expected_sans=[up.expected_san], sni=up.sni, inline=inline
        )
        clusters.append(cluster)
    config = b.bootstrap(
        [b.http_listener("outbound", listener_port, routes, stat_prefix="outbound")], clusters
    )
    return _with_admin(config, admin_port)


def _with_admin(config: b.Json, admin_port: int | None) -> b.Json:
    if admin_port is not None:
        config["admin"] = {"address": b.socket_address(admin_port)}
    return config
