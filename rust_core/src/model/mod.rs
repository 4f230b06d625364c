//! The engine's own typed, immutable configuration model, built by the xDS decoder.

pub mod adaptive_concurrency;
pub mod circuit_breaker;
pub mod cluster;
pub mod fallback;
pub mod fault;
pub mod headers;
pub mod listener;
pub mod global_ratelimit;
pub mod local_ratelimit;
pub mod matcher;
pub mod outlier;
pub mod retry;
pub mod route;
pub mod secret;
pub mod tls;
pub mod tracing;
pub mod workload;

/// Durations appear in /config_dump as whole milliseconds.
pub(crate) mod millis {
    use std::time::Duration;
    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }
}

/// An optional duration in milliseconds; None (disabled) as null.
pub(crate) mod optional_millis {
    use std::time::Duration;
    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_u64(d.as_millis() as u64),
            None => s.serialize_none(),
        }
    }
}

pub use cluster::{ClusterConfig, EndpointConfig, EndpointSource, LbPolicy, UpstreamProtocol};
pub use listener::{ChainMatch, FilterChainConfig, HttpFilter, HttpLimits, HttpSettings, ListenerConfig, NetworkHandler, RouteSource, TcpProxyConfig};
pub use route::{Action, ClusterChoice, RouteConfig};
