//! Telemetry: counters and latency histograms, rendered in Prometheus text format.

pub mod metrics;
pub mod resilience;
