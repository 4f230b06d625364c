"""Global RateLimit rules in Envoy's terms: `envoy.filters.http.ratelimit` before the router, asking
the control plane's rate limit service (ratelimit_service) over the cluster compiled here, with
the same route `rate_limits` actions (descriptors) as local rules.

Choices where Envoy is silent:
- one filter per connection manager, so its status, failure mode and timeout are per listener:
  the status is the first global rule's there (virtual hosts in name order, each host's
  RateLimits oldest first; a RateLimit's rules all share one); failure_mode_deny if any RateLimit there asks
  for it (its owner wants the limit kept even when the service is away); the response headers
  are per rule, sent by the service in `response_headers_to_add`;
- shadow: Envoy's filter has no per-descriptor shadow; the service counts shadow rules and
  answers OK for them;
- stage 1 for the global rules (STAGE), so the two filters never see each other's descriptors.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from meshctl.control import compiler_mtls as mtls
from meshctl.identity.ca import control_plane_id
from meshctl.resources.rate_limit import RateLimitResponse

Json = dict[str, Any]

FILTER = "envoy.filters.http.ratelimit"
TYPE = "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit"
DOMAIN = "meshctl"
CLUSTER = "meshctl-ratelimit"
# The global rules' route actions and the filter are stage 1, the local ones stage 0 (Envoy's
# default): each filter then makes only its own rules' descriptors, so a locally limited request
# never calls the service, and a global one never looks for a local bucket.
STAGE = 1
# The plane answers in Python over TLS: Envoy's 20 ms default is too tight for it under load.
TIMEOUT = "0.1s"
HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
HTTP_PROTOCOL_OPTIONS_TYPE = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


@dataclass(frozen=True)
class ServiceAddress:
    """Where sidecars ask: the control plane's xDS port, by a name its certificate carries, over
    TLS (unless the plane serves h2c, for debugging only); the plane is told from a workload by
    the URI SAN `identity` (identity.ca.control_plane_id)."""

    host: str = "localhost"
    port: int = 15012
    tls: bool = True
    identity: str = control_plane_id("cluster.local")


def rule_name(namespace: str, name: str, index: int) -> str:
    """The descriptor value naming a rule, for the compiler's actions and the service's counters."""
    return f"{namespace}/{name}/{index}"


def listener_filter(rules: Iterable[Any]) -> Json | None:
    """The ratelimit filter for a connection manager whose virtual hosts carry these global rules
    (AppliedRule, in virtual host order); None without any."""
    rules = list(rules)
    if not rules:
        return None
    response = rules[0].rule.response or RateLimitResponse()
    deny = any(applied.failure_mode_deny for applied in rules)
    return {
        "name": FILTER,
        "typed_config": {
            "@type": TYPE,
            "domain": DOMAIN,
            "stage": STAGE,
            "timeout": TIMEOUT,
            "failure_mode_deny": deny,
            "rate_limited_status": {"code": response.status},
            "rate_limit_service": {
                "grpc_service": {"envoy_grpc": {"cluster_name": CLUSTER}},
                "transport_api_version": "V3",
            },
        },
    }


def service_cluster(address: ServiceAddress, client_certificate: bool) -> Json:
    """The rate limit service's cluster: the control plane's xDS port over HTTP/2 and TLS, the
    plane verified against ROOTCA and by its URI SAN; with `client_certificate`, the sidecar's
    own (`default`), as for mesh mTLS. Without one (a sidecar with no identity) the service
    refuses its calls, and the filter's failure mode decides."""
    host, port = address.host, address.port
    try:
        ipaddress.ip_address(host)
        sni = None  # SNI carries host names only
    except ValueError:
        sni = host
    context: Json = {
        "alpn_protocols": ["h2"],
        "combined_validation_context": {
            "default_validation_context": {"match_typed_subject_alt_names": [
                {"san_type": "URI", "matcher": {"exact": address.identity}}]},
            "validation_context_sds_secret_config": mtls.sds(mtls.ROOT_SECRET),
        },
    }
    if client_certificate:
        context["tls_certificate_sds_secret_configs"] = [mtls.sds(mtls.WORKLOAD_SECRET)]
    tls: Json = {"@type": mtls.UPSTREAM_TLS_TYPE, "common_tls_context": context}
    if sni is not None:
        tls["sni"] = sni
    cluster: Json = {
        "name": CLUSTER,
        "type": "STRICT_DNS" if sni is not None else "STATIC",
        "connect_timeout": "5s",
        "load_assignment": {
            "cluster_name": CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": host, "port_value": port}}}}]}],
        },  # fmt: skip
        "typed_extension_protocol_options": {
            HTTP_PROTOCOL_OPTIONS: {"@type": HTTP_PROTOCOL_OPTIONS_TYPE, "explicit_http_config": {"http2_protocol_options": {}}}
        },
    }
    if address.tls:
        cluster["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": tls}
    return cluster


def with_service_cluster(
    clusters: Sequence[Json], plaintext: Sequence[Json], address: ServiceAddress
) -> tuple[list[Json], list[Json]]:
    """(clusters, plaintext clusters) with the service's cluster added: with the sidecar's
    certificate for callers that have one, without for the others."""
    return (
        [*clusters, service_cluster(address, True)],
        [*plaintext, service_cluster(address, False)],
    )
