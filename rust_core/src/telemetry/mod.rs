//! Telemetry: counters and latency histograms, rendered in Prometheus text format; access logs.

pub mod access_log;
pub mod metrics;
pub mod resilience;
