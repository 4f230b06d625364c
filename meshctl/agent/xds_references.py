"""What the ADS client reads inside xDS resources: names, and the EDS and RDS names they refer to."""

from __future__ import annotations

from collections.abc import Iterable

from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment
from envoy.config.listener.v3.listener_components_pb2 import Filter
from envoy.config.listener.v3.listener_pb2 import Listener
from envoy.config.route.v3.route_pb2 import RouteConfiguration
from envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2 import (
    HttpConnectionManager,
)
from envoy.service.discovery.v3.discovery_pb2 import Resource
from google.protobuf.any_pb2 import Any as AnyMessage
from google.protobuf.message import DecodeError, Message

_PREFIX = "type.googleapis.com/"
LISTENER = _PREFIX + Listener.DESCRIPTOR.full_name
ROUTE = _PREFIX + RouteConfiguration.DESCRIPTOR.full_name
CLUSTER = _PREFIX + Cluster.DESCRIPTOR.full_name
ENDPOINT = _PREFIX + ClusterLoadAssignment.DESCRIPTOR.full_name
_RESOURCE_WRAPPER = _PREFIX + Resource.DESCRIPTOR.full_name
_HCM = _PREFIX + HttpConnectionManager.DESCRIPTOR.full_name

MESSAGE_TYPES: dict[str, type[Message]] = {
    LISTENER: Listener,
    ROUTE: RouteConfiguration,
    CLUSTER: Cluster,
    ENDPOINT: ClusterLoadAssignment,
}


class ResourceError(ValueError):
    """A response carried something that is not a well-formed resource of its type."""


def decode_resources(type_url: str, packed: Iterable[AnyMessage]) -> dict[str, tuple[bytes, Message]]:
    """name → (serialized bytes, message) for every resource of a DiscoveryResponse.

    Unwraps envoy.service.discovery.v3.Resource; refuses wrong types, undecodable bytes, missing
    and duplicate names, naming the position and the resource.
    """
    message_type = MESSAGE_TYPES[type_url]
    decoded: dict[str, tuple[bytes, Message]] = {}
    for position, item in enumerate(packed):
        if item.type_url == _RESOURCE_WRAPPER:
            wrapper = Resource.FromString(item.value)
            if not wrapper.HasField("resource"):
                raise ResourceError(f"resources[{position}]: a Resource wrapper without a resource")
            item = wrapper.resource
        if item.type_url != type_url:
            raise ResourceError(f"resources[{position}]: is a {item.type_url}, the response is for {type_url}")
        try:
            message = message_type.FromString(item.value)
        except DecodeError as error:
            raise ResourceError(f"resources[{position}]: cannot decode {message_type.DESCRIPTOR.name}: {error}") from None
        name = message.cluster_name if isinstance(message, ClusterLoadAssignment) else message.name
        if not name:
            raise ResourceError(f"resources[{position}]: {message_type.DESCRIPTOR.name} without a name")
        if name in decoded:
            raise ResourceError(f'resources[{position}]: {message_type.DESCRIPTOR.name} "{name}" appears twice')
        decoded[name] = (item.value, message)
    return decoded


def eds_names(clusters: Iterable[Cluster]) -> frozenset[str]:
    """The ClusterLoadAssignment names that EDS clusters wait for."""
    names = set()
    for cluster in clusters:
        if cluster.WhichOneof("cluster_discovery_type") == "type" and cluster.type == Cluster.EDS:
            names.add(cluster.eds_cluster_config.service_name or cluster.name)
    return frozenset(names)


def rds_names(listeners: Iterable[Listener]) -> frozenset[str]:
    """The RouteConfiguration names that listeners' HTTP connection managers load over RDS."""
    names = set()
    for listener in listeners:
        chains = list(listener.filter_chains)
        if listener.HasField("default_filter_chain"):
            chains.append(listener.default_filter_chain)
        for chain in chains:
            for network_filter in chain.filters:
                name = _rds_name(network_filter)
                if name:
                    names.add(name)
    return frozenset(names)


def _rds_name(network_filter: Filter) -> str | None:
    if network_filter.typed_config.type_url != _HCM:
        return None
    try:
        manager = HttpConnectionManager.FromString(network_filter.typed_config.value)
    except DecodeError:
        return None  # the engine refuses the listener and says why; nothing to subscribe to
    return manager.rds.route_config_name if manager.HasField("rds") else None
