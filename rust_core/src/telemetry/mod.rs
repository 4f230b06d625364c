//! Telemetry: counters and latency histograms, rendered in Prometheus text format; access logs; trace spans.

pub mod access_log;
pub mod istio_metrics;
pub mod metrics;
pub mod peer_header;
pub mod resilience;
pub mod sampling;
pub mod span;
pub mod span_export;
pub mod otlp;
pub mod trace_context;
