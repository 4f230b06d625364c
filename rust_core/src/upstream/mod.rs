//! Upstreams: cluster runtimes with their endpoints, connection pools, load balancers and
//! outlier detection.

pub mod circuit_breaker;
pub mod cluster;
pub mod destination_breaker;
pub mod fallback;
pub mod lb;
pub mod outlier;
pub mod pool;

pub use cluster::{ClusterRuntime, Endpoint};
