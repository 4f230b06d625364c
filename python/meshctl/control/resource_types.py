"""The xDS resource types ADS serves: their type URLs, delivery order, and how each is named."""

from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment
from envoy.config.listener.v3.listener_pb2 import Listener
from envoy.config.route.v3.route_pb2 import RouteConfiguration
from envoy.extensions.transport_sockets.tls.v3.secret_pb2 import Secret
from google.protobuf.message import Message

_PREFIX = "type.googleapis.com/"

LISTENER = _PREFIX + Listener.DESCRIPTOR.full_name
ROUTE = _PREFIX + RouteConfiguration.DESCRIPTOR.full_name
CLUSTER = _PREFIX + Cluster.DESCRIPTOR.full_name
ENDPOINT = _PREFIX + ClusterLoadAssignment.DESCRIPTOR.full_name
SECRET = _PREFIX + Secret.DESCRIPTOR.full_name

# Envoy's make-before-break order: the secrets (SDS: the trust bundle ROOTCA) a cluster or
# listener verifies peers with come first, then a cluster exists (CDS) and has endpoints (EDS)
# before a listener (LDS) or route (RDS) that sends traffic to it.
ORDER = (SECRET, CLUSTER, ENDPOINT, LISTENER, ROUTE)

# Listeners and clusters are requested as "everything"; in state-of-the-world, a name missing from
# a response means that resource was removed. Routes, endpoints and secrets are requested by name.
WILDCARD_TYPES = frozenset({LISTENER, CLUSTER})

MESSAGE_TYPES: dict[str, type[Message]] = {
    LISTENER: Listener,
    ROUTE: RouteConfiguration,
    CLUSTER: Cluster,
    ENDPOINT: ClusterLoadAssignment,
    SECRET: Secret,
}

SHORT_NAMES = {LISTENER: "LDS", ROUTE: "RDS", CLUSTER: "CDS", ENDPOINT: "EDS", SECRET: "SDS"}


def resource_name(message: Message) -> str:
    """The name a resource is requested and replaced by (ClusterLoadAssignment uses cluster_name)."""
    if isinstance(message, ClusterLoadAssignment):
        return message.cluster_name
    return message.name  # type: ignore[attr-defined]
