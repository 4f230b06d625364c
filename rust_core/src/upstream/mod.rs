//! Upstreams: cluster runtimes with their endpoints, connection pools and load balancers.

pub mod circuit_breaker;
pub mod cluster;
pub mod lb;
pub mod pool;

pub use cluster::{ClusterRuntime, Endpoint};
