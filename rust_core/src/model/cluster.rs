//! Upstream clusters: how to reach a service's endpoints and balance load across them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClusterConfig {
    pub name: String,
    #[serde(with = "super::millis")]
    pub connect_timeout: Duration,
    pub lb_policy: LbPolicy,
    pub protocol: UpstreamProtocol,
    pub endpoints: EndpointSource,
    /// Idle pooled connections are closed after this long.
    #[serde(with = "super::millis")]
    pub idle_timeout: Duration,
    /// 0: unlimited.
    pub max_requests_per_connection: u32,
    /// Response headers larger than this are refused (bytes).
    pub max_response_headers_bytes: u32,
    /// TLS (usually mTLS) to the endpoints; None: plaintext.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<Arc<super::tls::UpstreamTls>>,
    /// Envoy's defaults when the cluster sets none.
    pub circuit_breakers: super::circuit_breaker::CircuitBreakers,
    /// Passive health checking; None: no endpoint is ever ejected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<super::outlier::OutlierDetection>,
    /// Percent of healthy endpoints below which the balancer uses every endpoint (Envoy's panic
    /// mode); 0 disables panic mode.
    pub healthy_panic_threshold: u32,
    /// Health changes (ejections, returns) within this long of the last one the balancer took
    /// reach it together at the end of the window (Envoy's update_merge_window); zero: at once.
    #[serde(with = "super::millis")]
    pub update_merge_window: Duration,
    /// meshctl's Fallback for this cluster: None, failures reach the caller as they are.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback: Option<Arc<super::fallback::FallbackConfig>>,
    /// How long a request may wait for a connection (meshctl.concurrency's queue_timeout); None:
    /// as Envoy, until the route's timeout.
    #[serde(skip_serializing_if = "Option::is_none", with = "super::optional_millis")]
    pub queue_timeout: Option<Duration>,
    /// The service it serves (cluster metadata `istio.services`), for Istio's destination_service*.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<Arc<super::workload::ServiceMetadata>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LbPolicy {
    RoundRobin,
    /// Power of two random choices, the fewer active requests wins.
    LeastRequest,
    Random,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    Http1,
    Http2,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EndpointSource {
    Static { endpoints: Vec<EndpointConfig> },
    /// Endpoints arrive as a ClusterLoadAssignment named `service_name`.
    Eds { service_name: String },
    /// The endpoint is where the downstream connection was originally going (transparent capture).
    OriginalDestination,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EndpointConfig {
    pub address: SocketAddr,
    pub weight: u32,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The health the control plane assigned (EDS `health_status`).
    #[serde(skip_serializing_if = "HealthStatus::is_healthy")]
    pub health_status: HealthStatus,
    /// The workload behind it (endpoint metadata), for Istio's destination_* labels.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload: Option<Arc<super::workload::WorkloadMetadata>>,
}

/// An endpoint's health as EDS assigns it. Envoy keeps an UNHEALTHY (or TIMEOUT) host in the
/// cluster: it takes no traffic, but counts towards the panic threshold and takes traffic in panic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum HealthStatus {
    /// HEALTHY, UNKNOWN and DEGRADED (Envoy would use a DEGRADED host only when too few are
    /// healthy; meshctl does not tell it apart yet).
    #[default]
    Healthy,
    /// UNHEALTHY and TIMEOUT.
    Unhealthy,
}

impl HealthStatus {
    pub fn is_healthy(&self) -> bool {
        *self == HealthStatus::Healthy
    }
}
