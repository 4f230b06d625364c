"""Telemetry tracing → Envoy's HCM `tracing` (OpenTelemetry provider, OTLP/gRPC to a collector cluster), listener directions and route decorators."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any

from meshctl.resources.extension_providers import (
    OpenTelemetryProvider,
    default_tracing_provider,
    tracing_providers,
)
from meshctl.resources.security_common import scope_levels
from meshctl.resources.telemetry import Tracing

Json = dict[str, Any]

OPENTELEMETRY_TYPE = "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig"
HCM_NAME = "envoy.filters.network.http_connection_manager"
CLIENT, SERVER = "CLIENT", "SERVER"
# Istio's mesh-wide default when a Telemetry sets no randomSamplingPercentage (MeshConfig
# defaultConfig.tracing.sampling).
DEFAULT_SAMPLING_PERCENT = 1.0
EXPORT_TIMEOUT = "5s"


def _applies(tracing: Tracing, direction: str) -> bool:
    mode = tracing.match.mode if tracing.match is not None else "CLIENT_AND_SERVER"
    return mode in ("CLIENT_AND_SERVER", direction)


def _level_tracing(spec: Any, direction: str) -> Tracing | None:
    """A Telemetry's tracing entry for one direction (Istio reads the first); None: says nothing."""
    return next((entry for entry in spec.tracing or [] if _applies(entry, direction)), None)


def chosen_tracing(telemetries: Sequence[Any], namespace: str, labels: Mapping[str, str], direction: str) -> Tracing | None:
    """The workload's tracing for `direction`: its own Telemetry over its namespace's over the mesh's, as Istio."""
    mesh, namespace_wide, workload = scope_levels(
        telemetries, namespace, labels, lambda telemetry: _level_tracing(telemetry.spec, direction)
    )
    return workload or namespace_wide or mesh


def provider_for(tracing: Tracing) -> OpenTelemetryProvider | None:
    """The entry's first provider (Istio sends to one), else the plane's default; None: none configured
    (validation refuses unknown names, but a provider may have gone since the resource was stored)."""
    if tracing.providers:
        return tracing_providers().get(tracing.providers[0].name)
    return default_tracing_provider()


def collector_cluster_name(provider: OpenTelemetryProvider) -> str:
    return f"outbound|{provider.port}||{provider.service}"


def collector_cluster(provider: OpenTelemetryProvider) -> Json:
    """An h2c cluster to the collector: STATIC for an address, STRICT_DNS for a name."""
    name = collector_cluster_name(provider)
    try:
        ipaddress.ip_address(provider.service)
        kind = "STATIC"
    except ValueError:
        kind = "STRICT_DNS"
    address = {"socket_address": {"address": provider.service, "port_value": provider.port}}
    return {
        "name": name,
        "type": kind,
        "connect_timeout": "5s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}]},
    }


def _custom_tags(tracing: Tracing, sidecar: Any) -> list[Json]:
    labels = sidecar.all_labels
    # Istio's own tags on every span (istiod puts them in each proxy's tracing config); node_id
    # too, which Envoy sets from its bootstrap and meshctl's engine does not know.
    fixed = {
        "istio.canonical_service": labels.get("service.istio.io/canonical-name", labels.get("app", sidecar.service)),
        "istio.canonical_revision": labels.get("service.istio.io/canonical-revision", labels.get("version", "latest")),
        "istio.namespace": sidecar.namespace,
        "node_id": sidecar.node_id,
    }
    tags = [{"tag": tag, "literal": {"value": value}} for tag, value in fixed.items()]
    for tag, custom in sorted((tracing.custom_tags or {}).items()):
        if custom.literal is not None:
            tags.append({"tag": tag, "literal": {"value": custom.literal.value}})
        elif custom.environment is not None:
            tags.append({"tag": tag, "environment": {"name": custom.environment.name, "default_value": custom.environment.default_value or ""}})
        elif custom.header is not None:
            tags.append({"tag": tag, "request_header": {"name": custom.header.name, "default_value": custom.header.default_value or ""}})
    return tags


def hcm_tracing(tracing: Tracing, provider: OpenTelemetryProvider, sidecar: Any) -> Json:
    """Envoy's HttpConnectionManager.tracing for one direction of `sidecar`."""
    percent = tracing.random_sampling_percentage
    return {
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": {
                "@type": OPENTELEMETRY_TYPE,
                "grpc_service": {
                    "envoy_grpc": {"cluster_name": collector_cluster_name(provider), "authority": provider.service},
                    "timeout": EXPORT_TIMEOUT,
                },
                # Istio's service name for a workload's spans: <canonical service>.<namespace>.
                "service_name": f"{sidecar.service}.{sidecar.namespace}",
            },
        },
        "random_sampling": {"value": DEFAULT_SAMPLING_PERCENT if percent is None else percent},
        "custom_tags": _custom_tags(tracing, sidecar),
    }


def sidecar_tracing(telemetries: Sequence[Any], sidecar: Any) -> tuple[dict[str, Json], list[Json]]:
    """Per direction (CLIENT, SERVER) the HCM tracing config, and the collector clusters it needs."""
    configs: dict[str, Json] = {}
    clusters: dict[str, Json] = {}
    for direction in (CLIENT, SERVER):
        tracing = chosen_tracing(telemetries, sidecar.namespace, sidecar.all_labels, direction)
        if tracing is None or tracing.disable_span_reporting:
            continue
        provider = provider_for(tracing)
        if provider is None:
            continue
        configs[direction] = hcm_tracing(tracing, provider, sidecar)
        clusters[collector_cluster_name(provider)] = collector_cluster(provider)
    return configs, list(clusters.values())


def decorate_routes(table: Json) -> Json:
    """Istio's route decorators, `<host>:<port>/*` (its virtual host's name): the span names."""
    for virtual_host in table["virtual_hosts"]:
        for route in virtual_host["routes"]:
            route.setdefault("decorator", {"operation": f"{virtual_host['name']}/*"})
    return table


def with_tracing(listeners: list[Json], tracing_for: Mapping[str, Json | None], inbound_name: str, inbound_operation: str) -> list[Json]:
    """`listeners` with each connection manager given its direction's tracing (`tracing_for`:
    CLIENT, SERVER), each listener its traffic_direction (Envoy's span kind), and the inbound
    routes the decorator naming the service. Copies what it changes."""
    changed = []
    for listener in listeners:
        inbound = listener["name"] == inbound_name
        tracing = tracing_for.get(SERVER if inbound else CLIENT)
        if tracing is None:
            changed.append(listener)
            continue
        chains = []
        for chain in listener["filter_chains"]:
            filters = []
            for network_filter in chain["filters"]:
                if network_filter.get("name") == HCM_NAME:
                    config = {**network_filter.get("typed_config", {}), "tracing": tracing}
                    if inbound and "route_config" in config:
                        routes = config["route_config"]
                        config["route_config"] = {**routes, "virtual_hosts": [
                            {**vhost, "routes": [{"decorator": {"operation": inbound_operation}, **route} for route in vhost["routes"]]}
                            for vhost in routes["virtual_hosts"]
                        ]}  # fmt: skip
                    network_filter = {**network_filter, "typed_config": config}
                filters.append(network_filter)
            chains.append({**chain, "filters": filters})
        changed.append({**listener, "filter_chains": chains, "traffic_direction": "INBOUND" if inbound else "OUTBOUND"})
    return changed
