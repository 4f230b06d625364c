"""Typed stubs of meshctl._core, the Rust data-plane engine (rust_core) exposed through PyO3."""

from collections.abc import Sequence

LISTENER_TYPE: str  # "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE_CONFIGURATION_TYPE: str  # "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER_TYPE: str  # "type.googleapis.com/envoy.config.cluster.v3.Cluster"
CLUSTER_LOAD_ASSIGNMENT_TYPE: str  # "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
SECRET_TYPE: str  # "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"

class ConfigError(ValueError):
    """A bootstrap or xDS resource was refused. str() names the resource, the field and the reason."""

def validate_bootstrap(bootstrap: bytes) -> None:
    """Decode and validate a serialized envoy.config.bootstrap.v3.Bootstrap without starting anything.

    Raises ConfigError naming the resource and field that is wrong.
    """

def weighted_pick(weights: Sequence[int], draw: int) -> int:
    """The index the engine's weighted picker chooses for `draw` in [0, sum(weights)).

    Exposed so property tests can check the picker the data path uses.
    """

class Engine:
    """A running engine: its own tokio runtime, listeners, upstream pools and admin endpoint."""

    def __init__(
        self,
        bootstrap: bytes,
        *,
        worker_threads: int = 1,
        istio_metrics_expiry: float = 600.0,
        istio_metrics_max_series: int = 10_000,
    ) -> None:
        """Validate the serialized Bootstrap, bind its listeners and admin address, start serving.

        Istio's standard metrics drop a series not updated for `istio_metrics_expiry` seconds, and
        keep at most `istio_metrics_max_series` of each kind (ValueError names a bad one).

        Raises ConfigError (nothing was started) or OSError (an address could not be bound;
        nothing is left running).
        """

    def apply(self, type_url: str, resources: Sequence[bytes]) -> None:
        """Add or replace resources of one xDS type, matched by name, in one atomic swap.

        Each item is a serialized protobuf of `type_url`. If any is refused, ConfigError names it
        and nothing changes. Requests in flight finish under the config they started with.
        Secrets (SECRET_TYPE, e.g. `default` and `ROOTCA`) are swapped in by name: the next TLS
        handshake that needs one uses it; listeners, clusters and open connections are untouched.
        """

    def remove(self, type_url: str, names: Sequence[str]) -> None:
        """Remove resources of one xDS type by name (unknown names are ignored)."""

    def stats_prometheus(self) -> str:
        """The engine's metrics in Prometheus text format (as served on /stats/prometheus)."""

    def config_dump(self) -> str:
        """The active model as JSON (as served on /config_dump)."""

    def local_rate_limit_counts(self) -> list[tuple[str, list[tuple[str, str]], int, int]]:
        """(stat_prefix, descriptor entries, allowed, limited) for every descriptor of a live
        local rate limit config: cumulative, kept across config reloads under one stat_prefix."""

    def admin_address(self) -> tuple[str, int] | None:
        """Where the admin endpoint listens, if the bootstrap configured one."""

    def listener_addresses(self) -> dict[str, tuple[str, int]]:
        """Each listener's name and the address it is bound to (port 0 resolved)."""

    def drain(self, timeout: float = 5.0) -> None:
        """Stop accepting, tell clients (HTTP/2 GOAWAY, Connection: close), wait for requests in
        flight to finish up to `timeout` seconds, then close what is left. Releases the GIL."""

    def stop(self) -> None:
        """Close every listener and connection now and stop the runtime."""
