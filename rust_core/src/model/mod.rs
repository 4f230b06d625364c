//! The engine's own typed, immutable configuration model, built by the xDS decoder.

pub mod cluster;
pub mod headers;
pub mod listener;
pub mod matcher;
pub mod route;

pub use cluster::{ClusterConfig, EndpointConfig, EndpointSource, LbPolicy, UpstreamProtocol};
pub use listener::{ChainMatch, FilterChainConfig, HttpLimits, HttpSettings, ListenerConfig, NetworkHandler, RouteSource, TcpProxyConfig};
pub use route::{Action, ClusterChoice, RouteConfig};
