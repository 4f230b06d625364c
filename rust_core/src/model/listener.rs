//! Listeners: an address, how connections on it are classified, and the filter chain each gets.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::route::RouteConfig;

#[derive(Debug, Serialize)]
pub struct ListenerConfig {
    pub name: String,
    pub address: SocketAddr,
    pub filter_chains: Vec<FilterChainConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_filter_chain: Option<FilterChainConfig>,
    /// How long to wait for the first bytes before classifying a connection as opaque TCP.
    #[serde(with = "super::millis")]
    pub detection_timeout: Duration,
    /// When detection times out: go on with what is known (true) or close the connection.
    pub continue_on_detection_timeout: bool,
    /// Look up where a redirected (iptables REDIRECT) connection was going, and hand it to the
    /// listener for that address if there is one (Envoy's use_original_dst).
    pub use_original_dst: bool,
    /// False for listeners that only receive connections handed over by a use_original_dst one.
    pub bind_to_port: bool,
    /// Whether any chain's choice depends on the detected protocol; if not, no wait is needed.
    #[serde(skip)]
    pub needs_detection: bool,
}

#[derive(Debug, Serialize)]
pub struct FilterChainConfig {
    pub name: String,
    #[serde(rename = "match")]
    pub chain_match: ChainMatch,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<ServerTls>,
    pub handler: NetworkHandler,
}

/// The subset of Envoy's FilterChainMatch the engine selects on.
#[derive(Debug, Default, Serialize)]
pub struct ChainMatch {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transport_protocol: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub application_protocols: Vec<String>,
    /// Lower-case; `*.example.com` wildcards allowed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub server_names: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination_port: Option<u16>,
}

pub use super::tls::ServerTls;

#[derive(Debug, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum NetworkHandler {
    Http(Arc<HttpSettings>),
    TcpProxy(TcpProxyConfig),
}

#[derive(Debug, Serialize)]
pub struct HttpSettings {
    pub stat_prefix: String,
    pub routes: RouteSource,
    pub codec: HttpCodec,
    pub limits: HttpLimits,
    /// Upgrade types (lower-case) allowed on this connection manager, e.g. "websocket".
    pub upgrades: Vec<String>,
    /// Applied once per request before routing: RBAC, routing and the upstream see its result.
    pub path_normalization: crate::policy::path::PathNormalization,
    /// The connection manager's RBAC filters, in order (none: every request passes).
    pub rbac: crate::policy::model::RbacFilters,
    /// What happens to x-forwarded-client-cert on this connection manager.
    pub forward_client_cert: super::tls::ForwardClientCert,
    /// The fault filter's own config when the manager has one (often empty: routes configure
    /// it); None: no fault filter, so routes' fault configs do nothing, as in Envoy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault: Option<std::sync::Arc<super::fault::FaultPolicy>>,
    /// The filters meshctl runs per request before the router, in http_filters' order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<HttpFilter>,
    /// Where Envoy takes the client's address from (for the remote_address rate-limit action):
    /// None: the connection's peer (use_remote_address); Some(hops): the x-forwarded-for entry
    /// that many hops from its end (xff_num_trusted_hops), else the peer.
    pub client_address_from_xff: Option<u32>,
    /// The access loggers; empty (the common case): the request path gathers nothing for them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub access_log: Vec<crate::telemetry::access_log::AccessLog>,
    /// The connection manager's tracing; None (the common case): the request path reads no
    /// trace headers and makes no spans.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tracing: Option<Arc<super::tracing::TracingConfig>>,
    /// Istio's standard metrics for this listener (from its metadata); None: none reported.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub istio: Option<Arc<super::workload::IstioStatsConfig>>,
}

/// One HTTP filter instance before the router (RBAC runs first, apart, in `rbac`).
#[derive(Debug, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum HttpFilter {
    /// The fault filter, whose config is the manager's `fault`.
    Fault,
    /// A local rate limit filter instance: routes' per-filter configs for it are found by `name`.
    LocalRateLimit { name: String, config: Arc<super::local_ratelimit::LocalRateLimit> },
    /// A global rate limit filter instance; `index` is its place in http_filters (for errors).
    GlobalRateLimit { name: String, index: usize, config: Arc<super::global_ratelimit::GlobalRateLimit> },
    /// The adaptive concurrency filter: its controller admits or sheds every request.
    AdaptiveConcurrency { config: Arc<super::adaptive_concurrency::AdaptiveConcurrency> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HttpCodec {
    Auto,
    Http1,
    Http2,
}

#[derive(Debug, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RouteSource {
    Inline { config: Arc<RouteConfig> },
    /// Looked up by name in the RouteConfigurations applied through xDS, per request.
    Rds { name: String },
}

/// Limits that protect the sidecar; defaults follow Envoy's where Envoy has one.
#[derive(Debug, Clone, Serialize)]
pub struct HttpLimits {
    /// Slowloris guard: the whole request head must arrive within this.
    #[serde(with = "super::optional_millis")]
    pub request_headers_timeout: Option<Duration>,
    /// A connection with no request in flight is closed after this.
    #[serde(with = "super::optional_millis")]
    pub idle_timeout: Option<Duration>,
    pub max_request_headers_bytes: u32,
    pub max_headers_count: u32,
    pub max_concurrent_streams: u32,
    pub initial_stream_window_size: u32,
    pub initial_connection_window_size: u32,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            request_headers_timeout: Some(Duration::from_secs(10)),
            idle_timeout: Some(Duration::from_secs(3600)),
            max_request_headers_bytes: 60 * 1024,
            max_headers_count: 100,
            max_concurrent_streams: 1024,
            initial_stream_window_size: 1024 * 1024,
            initial_connection_window_size: 4 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct TcpProxyConfig {
    pub stat_prefix: String,
    pub cluster: String,
    #[serde(with = "super::optional_millis")]
    pub idle_timeout: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub istio: Option<Arc<super::workload::IstioStatsConfig>>,
}
