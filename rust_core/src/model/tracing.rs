//! A connection manager's tracing config (Envoy's HCM `tracing` with the OpenTelemetry provider).

use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderName;
use serde::Serialize;

use crate::telemetry::span_export::SpanExporter;

/// Envoy's default cap on the http.url tag (max_path_tag_length).
pub const DEFAULT_MAX_PATH_TAG_LENGTH: usize = 256;

#[derive(Debug, Serialize)]
pub struct TracingConfig {
    /// SERVER on an inbound listener (traffic_direction INBOUND or unset, Envoy's "ingress"),
    /// CLIENT on an outbound one.
    pub kind: SpanKind,
    /// random_sampling: the share of requests whose caller did not decide, in percent (0–100).
    pub random_sampling_percent: f64,
    pub max_path_tag_length: usize,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub custom_tags: Vec<CustomTag>,
    /// Where finished spans go: the collector cluster's batching exporter, shared by every
    /// connection manager that names the same collector and service.
    #[serde(serialize_with = "exporter_target")]
    pub exporter: Arc<SpanExporter>,
}

fn exporter_target<S: serde::Serializer>(exporter: &Arc<SpanExporter>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&exporter.target.to_string())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SpanKind {
    Server,
    Client,
}

/// Where an OTLP exporter sends its batches.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CollectorTarget {
    pub cluster: String,
    /// The :authority of the Export calls (the grpc_service's, else the cluster's name).
    pub authority: String,
    pub timeout: Duration,
    /// OTLP's resource attribute service.name (what Jaeger lists as the service).
    pub service_name: String,
}

impl std::fmt::Display for CollectorTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (service {})", self.cluster, self.service_name)
    }
}

/// One custom tag: a fixed value, a request header's, or an environment variable's read once
/// when the config is decoded (as Envoy reads it at start).
#[derive(Debug, Clone, Serialize)]
pub struct CustomTag {
    pub tag: String,
    pub value: CustomTagValue,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CustomTagValue {
    Literal { value: String },
    RequestHeader {
        #[serde(serialize_with = "header_name")]
        name: HeaderName,
        /// Used when the request lacks the header; no tag when this is empty too.
        default_value: String,
    },
}

fn header_name<S: serde::Serializer>(name: &HeaderName, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(name.as_str())
}
