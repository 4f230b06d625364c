"""Snapshots for the ADS tests: two EDS clusters, one listener whose routes come over RDS, weights."""

from __future__ import annotations

from helpers import bootstrap as b

from meshctl.agent.bootstrap import resource_to_bytes
from meshctl.control import resource_types as types
from meshctl.control.snapshot import Snapshot

ROUTE_NAME = "mesh-routes"
LISTENER_NAME = "outbound"


def message(type_url: str, document: dict):
    """A resource dict as its protobuf message (parsed the way bootstrap files are)."""
    return types.MESSAGE_TYPES[type_url].FromString(resource_to_bytes(type_url, document))


def eds_cluster(name: str) -> dict:
    return {
        "name": name,
        "type": "EDS",
        "connect_timeout": "1s",
        "eds_cluster_config": {"eds_config": {"ads": {}, "resource_api_version": "V3"}},
    }


def assignment(name: str, port: int) -> dict:
    return {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": b.socket_address(port)}}]}]}


def mesh_snapshot(version: str, *, listener_port: int, upstreams: dict[str, int], weights: dict[str, int]) -> Snapshot:
    """Clusters and endpoints for `upstreams` (name → port), a listener on `listener_port`, and a
    route splitting all traffic by `weights`."""
    routes = b.route_configuration(ROUTE_NAME, [b.virtual_host("all", [b.weighted_route(weights)])])
    listener = b.listener(LISTENER_NAME, listener_port, [{"filters": [b.http_connection_manager(rds_name=ROUTE_NAME)]}])
    return Snapshot(
        version,
        {
            types.CLUSTER: [message(types.CLUSTER, eds_cluster(name)) for name in upstreams],
            types.ENDPOINT: [message(types.ENDPOINT, assignment(name, port)) for name, port in upstreams.items()],
            types.LISTENER: [message(types.LISTENER, listener)],
            types.ROUTE: [message(types.ROUTE, routes)],
        },
    )
