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
}
