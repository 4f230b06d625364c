//! Telemetry: counters and latency histograms, rendered in Prometheus text format; access logs.

pub mod access_log;
pub mod istio_metrics;
pub mod metrics;
pub mod peer_header;
pub mod resilience;
