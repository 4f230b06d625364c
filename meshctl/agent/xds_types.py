"""Imports the Envoy API message types meshctl reads, so `typed_config` Any fields can resolve."""

import importlib

from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message

# json_format resolves an Any's "@type" only among message types already imported, so every
# extension a bootstrap or xDS resource may name has to be imported before parsing.
_MODULES = (
    "envoy.config.bootstrap.v3.bootstrap_pb2",
    "envoy.config.listener.v3.listener_pb2",
    "envoy.config.route.v3.route_pb2",
    "envoy.config.cluster.v3.cluster_pb2",
    "envoy.config.endpoint.v3.endpoint_pb2",
    "envoy.service.discovery.v3.discovery_pb2",
    "envoy.extensions.filters.listener.http_inspector.v3.http_inspector_pb2",
    "envoy.extensions.filters.listener.tls_inspector.v3.tls_inspector_pb2",
    "envoy.extensions.filters.listener.original_dst.v3.original_dst_pb2",
    "envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2",
    "envoy.extensions.filters.network.tcp_proxy.v3.tcp_proxy_pb2",
    "envoy.extensions.filters.network.rbac.v3.rbac_pb2",
    "envoy.extensions.filters.http.router.v3.router_pb2",
    "envoy.extensions.filters.http.fault.v3.fault_pb2",
    "envoy.extensions.filters.http.local_ratelimit.v3.local_rate_limit_pb2",
    "envoy.extensions.filters.http.rbac.v3.rbac_pb2",
    "envoy.extensions.filters.http.cors.v3.cors_pb2",
    "envoy.extensions.filters.http.health_check.v3.health_check_pb2",
    "envoy.extensions.upstreams.http.v3.http_protocol_options_pb2",
    "envoy.extensions.transport_sockets.tls.v3.tls_pb2",
    "envoy.extensions.transport_sockets.tls.v3.secret_pb2",
    "envoy.extensions.transport_sockets.raw_buffer.v3.raw_buffer_pb2",
    "envoy.extensions.access_loggers.file.v3.file_pb2",
    "envoy.extensions.access_loggers.stream.v3.stream_pb2",
    "envoy.extensions.retry.host.previous_hosts.v3.previous_hosts_pb2",
    "envoy.extensions.load_balancing_policies.round_robin.v3.round_robin_pb2",
    "envoy.extensions.load_balancing_policies.least_request.v3.least_request_pb2",
    "envoy.extensions.load_balancing_policies.random.v3.random_pb2",
    "envoy.extensions.load_balancing_policies.ring_hash.v3.ring_hash_pb2",
    "envoy.extensions.load_balancing_policies.maglev.v3.maglev_pb2",
    "xds.type.v3.typed_struct_pb2",
    "udpa.type.v1.typed_struct_pb2",
)

for _module in _MODULES:
    importlib.import_module(_module)


def find_message_type(type_url: str) -> Descriptor | None:
    """The descriptor for `type.googleapis.com/<full name>` (or a bare full name), if imported."""
    full_name = type_url.rpartition("/")[2]
    try:
        return descriptor_pool.Default().FindMessageTypeByName(full_name)
    except KeyError:
        return None


def message_class(descriptor: Descriptor) -> type[Message]:
    """The generated Python class for `descriptor`."""
    return message_factory.GetMessageClass(descriptor)
