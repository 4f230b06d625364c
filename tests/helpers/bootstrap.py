"""Builders for Envoy v3 bootstrap dicts that both Envoy and `meshctl run` accept."""

from __future__ import annotations

from typing import Any

HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
TCP_PROXY_TYPE = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
HTTP_INSPECTOR_TYPE = "type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector"
TLS_INSPECTOR_TYPE = "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"
HTTP_PROTOCOL_OPTIONS_TYPE = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"

Json = dict[str, Any]


def socket_address(port: int, host: str = "127.0.0.1") -> Json:
    return {"socket_address": {"address": host, "port_value": port}}


def cluster(name: str, port: int, *, http2: bool = False, connect_timeout: str = "1s") -> Json:
    """A STATIC cluster with one loopback endpoint; `http2` makes upstream requests h2c."""
    result: Json = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": connect_timeout,
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": socket_address(port)}}]}],
        },
    }
    if http2:
        result["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": HTTP_PROTOCOL_OPTIONS_TYPE,
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    return result


def route(cluster_name: str, prefix: str = "/", **route_action: Any) -> Json:
    return {"match": {"prefix": prefix}, "route": {"cluster": cluster_name, **route_action}}


def weighted_route(weights: dict[str, int], prefix: str = "/") -> Json:
    clusters = [{"name": name, "weight": weight} for name, weight in weights.items()]
    return {"match": {"prefix": prefix}, "route": {"weighted_clusters": {"clusters": clusters}}}


def virtual_host(name: str, routes: list[Json], domains: list[str] | None = None, **extra: Any) -> Json:
    return {"name": name, "domains": domains or ["*"], "routes": routes, **extra}


def route_configuration(name: str, virtual_hosts: list[Json], **extra: Any) -> Json:
    return {"name": name, "virtual_hosts": virtual_hosts, **extra}


def http_connection_manager(
    route_config: Json | None = None,
    *,
    rds_name: str | None = None,
    websocket: bool = False,
    stat_prefix: str = "ingress_http",
    **extra: Any,
) -> Json:
    """An HCM network filter: inline `route_config`, or RDS over ADS when `rds_name` is given."""
    config: Json = {
        "@type": HCM_TYPE,
        "stat_prefix": stat_prefix,
        "codec_type": "AUTO",
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_TYPE}}],
        **extra,
    }
    if rds_name is not None:
        config["rds"] = {"route_config_name": rds_name, "config_source": {"ads": {}, "resource_api_version": "V3"}}
    else:
        config["route_config"] = route_config
    if websocket:
        config["upgrade_configs"] = [{"upgrade_type": "websocket"}]
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": config}


def tcp_proxy(cluster_name: str, stat_prefix: str = "tcp") -> Json:
    return {
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {"@type": TCP_PROXY_TYPE, "stat_prefix": stat_prefix, "cluster": cluster_name},
    }


def listener(name: str, port: int, filter_chains: list[Json], **extra: Any) -> Json:
    return {"name": name, "address": socket_address(port), "filter_chains": filter_chains, **extra}


def http_listener(name: str, port: int, route_config: Json | None = None, **hcm: Any) -> Json:
    return listener(name, port, [{"filters": [http_connection_manager(route_config, **hcm)]}])


def bootstrap(listeners: list[Json], clusters: list[Json], **extra: Any) -> Json:
    return {"static_resources": {"listeners": listeners, "clusters": clusters}, **extra}


def simple_proxy(listener_port: int, upstream_port: int, *, http2_upstream: bool = False, websocket: bool = False) -> Json:
    """One HTTP listener routing everything to one cluster named `upstream`."""
    routes = route_configuration("local", [virtual_host("all", [route("upstream")])])
    return bootstrap(
        [http_listener("http", listener_port, routes, websocket=websocket)],
        [cluster("upstream", upstream_port, http2=http2_upstream)],
    )


def listener_ports(config: Json) -> list[int]:
    listeners = config.get("static_resources", {}).get("listeners", [])
    return [entry["address"]["socket_address"]["port_value"] for entry in listeners]
