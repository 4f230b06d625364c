"""Run the control plane's compiled xDS on one data plane: the outbound listener (its HTTP filters
as compiled, the route table inline) and every outbound cluster made STATIC, pointing at test
upstreams, so meshctl and Envoy serve exactly what a sidecar would be sent."""

from __future__ import annotations

import copy
from typing import Any

from meshctl.control import resource_types as types
from meshctl.control.compiler import OUTBOUND_LISTENER

from helpers import bootstrap as b

Json = dict[str, Any]


def compiled_bootstrap(resources: dict[str, list[Json]], listener_port: int, admin_port: int, backends: dict[str, int]) -> Json:
    """`backends`: cluster name → the loopback port of its one endpoint (others stay empty)."""
    (table,) = resources[types.ROUTE]
    (outbound,) = [entry for entry in resources[types.LISTENER] if entry["name"] == OUTBOUND_LISTENER]
    manager = copy.deepcopy(outbound["filter_chains"][0]["filters"][0])
    manager["typed_config"].pop("rds")
    manager["typed_config"]["route_config"] = table
    clusters = []
    for compiled in resources[types.CLUSTER]:
        if not compiled["name"].startswith("outbound|"):
            continue
        cluster = copy.deepcopy(compiled)
        cluster.pop("eds_cluster_config", None)
        cluster["type"] = "STATIC"
        port = backends.get(cluster["name"])
        endpoints = [{"lb_endpoints": [{"endpoint": {"address": b.socket_address(port)}}]}] if port else []
        cluster["load_assignment"] = {"cluster_name": cluster["name"], "endpoints": endpoints}
        clusters.append(cluster)
    listener = {"name": "outbound", "address": b.socket_address(listener_port), "filter_chains": [{"filters": [manager]}]}
    config = b.bootstrap([listener], clusters)
    config["admin"] = {"address": b.socket_address(admin_port)}
    return config
