"""What the ADS client reads inside xDS resources: names, and the EDS, RDS and SDS names they refer to."""

from __future__ import annotations

from collections.abc import Iterable

from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.core.v3.base_pb2 import TransportSocket
from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment
from envoy.config.listener.v3.listener_components_pb2 import Filter
from envoy.config.listener.v3.listener_pb2 import Listener
from envoy.config.route.v3.route_pb2 import RouteConfiguration
from envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2 import (
    HttpConnectionManager,
)
from envoy.extensions.transport_sockets.tls.v3.secret_pb2 import Secret
from envoy.extensions.transport_sockets.tls.v3.tls_pb2 import (
    CommonTlsContext,
    DownstreamTlsContext,
    UpstreamTlsContext,
)
from envoy.service.discovery.v3.discovery_pb2 import Resource
from google.protobuf.any_pb2 import Any as AnyMessage
from google.protobuf.message import DecodeError, Message

_PREFIX = "type.googleapis.com/"
LISTENER = _PREFIX + Listener.DESCRIPTOR.full_name
ROUTE = _PREFIX + RouteConfiguration.DESCRIPTOR.full_name
CLUSTER = _PREFIX + Cluster.DESCRIPTOR.full_name
ENDPOINT = _PREFIX + ClusterLoadAssignment.DESCRIPTOR.full_name
SECRET = _PREFIX + Secret.DESCRIPTOR.full_name
_RESOURCE_WRAPPER = _PREFIX + Resource.DESCRIPTOR.full_name
_HCM = _PREFIX + HttpConnectionManager.DESCRIPTOR.full_name
_UPSTREAM_TLS = _PREFIX + UpstreamTlsContext.DESCRIPTOR.full_name
_DOWNSTREAM_TLS = _PREFIX + DownstreamTlsContext.DESCRIPTOR.full_name

# The workload's own certificate and key (Istio's name): the agent makes it and gives it to the
# engine itself, so it is never asked of the control plane (the key never leaves the sidecar).
WORKLOAD_SECRET = "default"
# The trust bundle and revocations (Istio's name), sent by the control plane.
TRUST_BUNDLE_SECRET = "ROOTCA"

MESSAGE_TYPES: dict[str, type[Message]] = {
    LISTENER: Listener,
    ROUTE: RouteConfiguration,
    CLUSTER: Cluster,
    ENDPOINT: ClusterLoadAssignment,
    SECRET: Secret,
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


def sds_names(clusters: Iterable[Cluster], listeners: Iterable[Listener]) -> frozenset[str]:
    """The Secret names the clusters' and listeners' TLS contexts load over SDS, except the
    workload's own (`default`), which the agent supplies."""
    names: set[str] = set()
    for cluster in clusters:
        sockets = [cluster.transport_socket] if cluster.HasField("transport_socket") else []
        sockets += [match.transport_socket for match in cluster.transport_socket_matches]
        for socket in sockets:
            names |= _secret_names(socket, UpstreamTlsContext)
    for listener in listeners:
        chains = list(listener.filter_chains)
        if listener.HasField("default_filter_chain"):
            chains.append(listener.default_filter_chain)
        for chain in chains:
            if chain.HasField("transport_socket"):
                names |= _secret_names(chain.transport_socket, DownstreamTlsContext)
    names.discard(WORKLOAD_SECRET)
    return frozenset(names)


def _secret_names(
    socket: TransportSocket, context_type: type[UpstreamTlsContext | DownstreamTlsContext]
) -> set[str]:
    expected = _UPSTREAM_TLS if context_type is UpstreamTlsContext else _DOWNSTREAM_TLS
    if socket.typed_config.type_url != expected:
        return set()
    try:
        common = context_type.FromString(socket.typed_config.value).common_tls_context
    except DecodeError:
        return set()  # the engine refuses the resource and says why
    return _common_secret_names(common)


def _common_secret_names(common: CommonTlsContext) -> set[str]:
    names = {config.name for config in common.tls_certificate_sds_secret_configs}
    if common.HasField("validation_context_sds_secret_config"):
        names.add(common.validation_context_sds_secret_config.name)
    if common.HasField("combined_validation_context"):
        combined = common.combined_validation_context
        if combined.HasField("validation_context_sds_secret_config"):
            names.add(combined.validation_context_sds_secret_config.name)
    return {name for name in names if name}
