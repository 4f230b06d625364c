"""A DestinationRule's traffic policy: load balancing, connection-pool limits (circuit breaking),
outlier detection and the retry budget, for the whole host, one port, or one subset."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from meshctl.resources.common import Duration, MeshModel, Port
from meshctl.resources.support import UNSUPPORTED

Later = Annotated[Any, UNSUPPORTED]
# Istio's int32 counts: negative values are refused (Istio's validation does the same).
Count = Annotated[int, Field(ge=0, le=2**31 - 1)]
Percent = Annotated[int, Field(ge=0, le=100)]


class LoadBalancer(MeshModel):
    simple: Literal["ROUND_ROBIN", "LEAST_REQUEST", "RANDOM"] | None = None
    consistent_hash: Later = None
    locality_lb_setting: Later = None
    warmup_duration_secs: Later = None
    warmup: Later = None


class TcpSettings(MeshModel):
    max_connections: Count | None = None
    connect_timeout: Duration | None = None
    tcp_keepalive: Later = None
    max_connection_duration: Later = None
    idle_timeout: Later = None


class HttpSettings(MeshModel):
    http1_max_pending_requests: Annotated[Count | None, Field(alias="http1MaxPendingRequests")] = None
    http2_max_requests: Annotated[Count | None, Field(alias="http2MaxRequests")] = None
    max_requests_per_connection: Count | None = None
    max_retries: Count | None = None
    idle_timeout: Duration | None = None
    h2_upgrade_policy: Annotated[Any, UNSUPPORTED, Field(alias="h2UpgradePolicy")] = None
    use_client_protocol: Later = None
    max_concurrent_streams: Later = None


class ConnectionPool(MeshModel):
    tcp: TcpSettings | None = None
    http: HttpSettings | None = None


class OutlierDetection(MeshModel):
    consecutive_5xx_errors: Annotated[Count | None, Field(alias="consecutive5xxErrors")] = None
    consecutive_gateway_errors: Count | None = None
    split_external_local_origin_errors: bool | None = None
    consecutive_local_origin_failures: Count | None = None
    interval: Duration | None = None
    base_ejection_time: Duration | None = None
    max_ejection_percent: Percent | None = None
    min_health_percent: Percent | None = None
    consecutive_errors: Annotated[Any, UNSUPPORTED] = None  # deprecated in Istio: consecutive5xxErrors


class RetryBudget(MeshModel):
    """Istio's newer `trafficPolicy.retryBudget` (Envoy's circuit_breakers retry_budget)."""

    percent: Annotated[float, Field(ge=0, le=100)] | None = None
    min_retry_concurrency: Count | None = None


class PortSelector(MeshModel):
    number: Port


class PortTrafficPolicy(MeshModel):
    port: PortSelector
    load_balancer: LoadBalancer | None = None
    connection_pool: ConnectionPool | None = None
    outlier_detection: OutlierDetection | None = None
    tls: Later = None


class TrafficPolicy(MeshModel):
    load_balancer: LoadBalancer | None = None
    connection_pool: ConnectionPool | None = None
    outlier_detection: OutlierDetection | None = None
    port_level_settings: list[PortTrafficPolicy] | None = None
    retry_budget: RetryBudget | None = None
    tls: Later = None
    tunnel: Later = None
    proxy_protocol: Later = None
