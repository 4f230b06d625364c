//! HCM `tracing` → model::tracing::TracingConfig: the OpenTelemetry provider (OTLP over gRPC to
//! a cluster), random sampling, custom tags; every other tracer and knob is refused by name.

use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::trace::v3 as trace;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::r#type::tracing::v3 as tags;
use http::header::HeaderName;

use super::common::{duration, unpack};
use super::grpc_service::envoy_grpc_target;
use super::{refuse_if, At, FieldError, FieldResult};
use crate::model::tracing::{CollectorTarget, CustomTag, CustomTagValue, SpanKind, TracingConfig, DEFAULT_MAX_PATH_TAG_LENGTH};
use crate::telemetry::span_export;

const OPENTELEMETRY_TYPE: &str = "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig";
/// Envoy's default gRPC timeout for a tracer's export calls when grpc_service sets none.
const DEFAULT_EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// Envoy's default service.name for the OpenTelemetry tracer.
const DEFAULT_SERVICE_NAME: &str = "unknown_service:envoy";
/// The cap meshctl puts on http.url however long max_path_tag_length asks (bounded batches).
const MAX_PATH_TAG_LENGTH: usize = 8192;

/// `kind`: from the listener's traffic_direction (see `span_kind`).
pub(crate) fn tracing_config(t: &hcm::http_connection_manager::Tracing, kind: SpanKind) -> FieldResult<TracingConfig> {
    refuse_if(t.verbose, "verbose")?;
    refuse_if(t.spawn_upstream_span.as_ref().is_some_and(|b| b.value), "spawn_upstream_span")?;
    // client_sampling concerns x-client-trace-id and overall_sampling a second draw; meshctl
    // implements neither, so only their neutral value (100 %) is accepted.
    for (field, percent) in [("client_sampling", &t.client_sampling), ("overall_sampling", &t.overall_sampling)] {
        if percent.as_ref().is_some_and(|p| p.value != 100.0) {
            return Err(FieldError::new(field, "is not supported by meshctl yet (only 100)"));
        }
    }
    let random_sampling_percent = match &t.random_sampling {
        Some(p) if !(0.0..=100.0).contains(&p.value) || p.value.is_nan() => {
            return Err(FieldError::new("random_sampling.value", format!("{} is not a percentage (0 to 100)", p.value)))
        }
        Some(p) => p.value,
        None => 100.0,
    };
    let max_path_tag_length = t
        .max_path_tag_length
        .as_ref()
        .map_or(DEFAULT_MAX_PATH_TAG_LENGTH, |v| (v.value as usize).min(MAX_PATH_TAG_LENGTH));
    let custom_tags = t.custom_tags.iter().enumerate().map(|(i, tag)| custom_tag(tag).at(format!("custom_tags[{i}]"))).collect::<FieldResult<Vec<_>>>()?;
    let provider = t.provider.as_ref().ok_or_else(|| FieldError::new("provider", "is required (meshctl has no tracer without one)"))?;
    let target = provider_target(provider).at("provider")?;
    Ok(TracingConfig {
        kind,
        random_sampling_percent,
        max_path_tag_length,
        custom_tags: custom_tags.into_iter().flatten().collect(),
        exporter: span_export::exporter(target),
    })
}

/// Envoy names spans by the listener's traffic_direction: INBOUND is "ingress" (SERVER spans),
/// OUTBOUND "egress" (CLIENT); unset falls back to the deprecated operation_name, whose default
/// is ingress.
pub(crate) fn span_kind(traffic_direction: i32) -> SpanKind {
    if traffic_direction == core::TrafficDirection::Outbound as i32 {
        SpanKind::Client
    } else {
        SpanKind::Server
    }
}

fn provider_target(p: &trace::tracing::Http) -> FieldResult<CollectorTarget> {
    use trace::tracing::http::ConfigType;
    let any = match &p.config_type {
        Some(ConfigType::TypedConfig(any)) => any,
        None => return Err(FieldError::new("typed_config", "is required")),
    };
    if any.type_url != OPENTELEMETRY_TYPE {
        return Err(FieldError::new(
            "typed_config",
            format!("tracer {:?} ({}) is not supported by meshctl yet (only {OPENTELEMETRY_TYPE})", p.name, any.type_url),
        ));
    }
    let config: trace::OpenTelemetryConfig = unpack(any, OPENTELEMETRY_TYPE).at("typed_config")?;
    opentelemetry(&config).at("typed_config")
}

fn opentelemetry(c: &trace::OpenTelemetryConfig) -> FieldResult<CollectorTarget> {
    refuse_if(c.http_service.is_some(), "http_service")?;
    refuse_if(c.exporter.is_some(), "exporter")?;
    refuse_if(!c.resource_detectors.is_empty(), "resource_detectors")?;
    refuse_if(c.sampler.is_some(), "sampler")?;
    refuse_if(c.max_cache_size.is_some(), "max_cache_size")?;
    let grpc = c.grpc_service.as_ref().ok_or_else(|| FieldError::new("grpc_service", "is required (meshctl exports OTLP over gRPC)"))?;
    let timeout = match &grpc.timeout {
        Some(d) => duration(d).at("grpc_service.timeout")?,
        None => DEFAULT_EXPORT_TIMEOUT,
    };
    let (cluster, authority) = envoy_grpc_target(grpc)?;
    let authority = authority.as_str().to_string();
    let service_name = if c.service_name.is_empty() { DEFAULT_SERVICE_NAME.to_string() } else { c.service_name.clone() };
    Ok(CollectorTarget { cluster, authority, timeout, service_name })
}

/// None: an environment tag whose variable is unset and has no default (Envoy sets no tag).
fn custom_tag(t: &tags::CustomTag) -> FieldResult<Option<CustomTag>> {
    use tags::custom_tag::Type;
    if t.tag.is_empty() {
        return Err(FieldError::new("tag", "is required"));
    }
    let value = match &t.r#type {
        Some(Type::Literal(literal)) => CustomTagValue::Literal { value: literal.value.clone() },
        Some(Type::Environment(env)) => {
            if env.name.is_empty() {
                return Err(FieldError::new("environment.name", "is required"));
            }
            // Read once, as Envoy reads it when it loads the config.
            let value = std::env::var(&env.name).ok().filter(|v| !v.is_empty()).unwrap_or_else(|| env.default_value.clone());
            if value.is_empty() {
                return Ok(None);
            }
            CustomTagValue::Literal { value }
        }
        Some(Type::RequestHeader(header)) => {
            let name = HeaderName::try_from(header.name.as_str())
                .map_err(|_| FieldError::new("request_header.name", format!("{:?} is not a header name", header.name)))?;
            CustomTagValue::RequestHeader { name, default_value: header.default_value.clone() }
        }
        Some(Type::Metadata(_)) => return Err(FieldError::unsupported("metadata")),
        Some(_) => return Err(FieldError::new("type", "this kind of custom tag is not supported by meshctl yet")),
        None => return Err(FieldError::new("type", "is required (literal, environment or request_header)")),
    };
    Ok(Some(CustomTag { tag: t.tag.clone(), value }))
}

/// Each HTTP connection manager of `chains` that traces learns its listener's direction. Its
/// settings were made moments ago and nothing else holds them yet.
pub(crate) fn apply_direction(chains: &mut [crate::model::listener::FilterChainConfig], traffic_direction: i32) {
    use crate::model::listener::NetworkHandler;
    let kind = span_kind(traffic_direction);
    for chain in chains {
        if let NetworkHandler::Http(settings) = &mut chain.handler {
            if let Some(tracing) = Arc::get_mut(settings).and_then(|s| s.tracing.as_mut()).and_then(Arc::get_mut) {
                tracing.kind = kind;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::r#type::v3::Percent;
    use prost::Message;

    fn provider(cluster: &str) -> trace::tracing::Http {
        let config = trace::OpenTelemetryConfig {
            grpc_service: Some(core::GrpcService {
                target_specifier: Some(core::grpc_service::TargetSpecifier::EnvoyGrpc(core::grpc_service::EnvoyGrpc {
                    cluster_name: cluster.into(),
                    ..Default::default()
                })),
                ..Default::default()
            }),
            service_name: "reviews.default".into(),
            ..Default::default()
        };
        trace::tracing::Http {
            name: "envoy.tracers.opentelemetry".into(),
            config_type: Some(trace::tracing::http::ConfigType::TypedConfig(envoy_types::pb::google::protobuf::Any {
                type_url: OPENTELEMETRY_TYPE.into(),
                value: config.encode_to_vec(),
            })),
        }
    }

    fn tracing(percent: f64) -> hcm::http_connection_manager::Tracing {
        hcm::http_connection_manager::Tracing {
            random_sampling: Some(Percent { value: percent }),
            provider: Some(provider("outbound|4317||jaeger")),
            custom_tags: vec![
                tags::CustomTag { tag: "istio.namespace".into(), r#type: Some(tags::custom_tag::Type::Literal(tags::custom_tag::Literal { value: "default".into() })) },
                tags::CustomTag {
                    tag: "client".into(),
                    r#type: Some(tags::custom_tag::Type::RequestHeader(tags::custom_tag::Header { name: "x-client".into(), default_value: "none".into() })),
                },
                tags::CustomTag {
                    tag: "unset".into(),
                    r#type: Some(tags::custom_tag::Type::Environment(tags::custom_tag::Environment { name: "MESHCTL_TEST_SURELY_UNSET".into(), default_value: "".into() })),
                },
            ],
            ..Default::default()
        }
    }

    #[test]
    fn the_opentelemetry_provider_decodes() {
        let config = tracing_config(&tracing(1.0), SpanKind::Client).unwrap();
        assert_eq!(config.random_sampling_percent, 1.0);
        assert_eq!(config.kind, SpanKind::Client);
        assert_eq!(config.exporter.target.cluster, "outbound|4317||jaeger");
        assert_eq!(config.exporter.target.authority, "outbound-4317--jaeger");
        assert_eq!(config.exporter.target.service_name, "reviews.default");
        assert_eq!(config.exporter.target.timeout, DEFAULT_EXPORT_TIMEOUT);
        // The unset environment variable without a default makes no tag.
        assert_eq!(config.custom_tags.len(), 2);
        assert_eq!(config.max_path_tag_length, DEFAULT_MAX_PATH_TAG_LENGTH);
    }

    #[test]
    fn what_meshctl_does_not_implement_is_refused_by_field() {
        let error = |t: hcm::http_connection_manager::Tracing| tracing_config(&t, SpanKind::Server).unwrap_err().into_config_error("t").to_string();
        assert!(error(tracing(101.0)).contains("random_sampling.value"));
        assert!(error(hcm::http_connection_manager::Tracing { verbose: true, ..tracing(1.0) }).contains("verbose"));
        assert!(error(hcm::http_connection_manager::Tracing { overall_sampling: Some(Percent { value: 5.0 }), ..tracing(1.0) }).contains("overall_sampling"));
        assert!(error(hcm::http_connection_manager::Tracing { provider: None, ..tracing(1.0) }).contains("provider"));
        let mut zipkin = tracing(1.0);
        if let Some(trace::tracing::http::ConfigType::TypedConfig(any)) = &mut zipkin.provider.as_mut().unwrap().config_type {
            any.type_url = "type.googleapis.com/envoy.config.trace.v3.ZipkinConfig".into();
        }
        assert!(error(zipkin).contains("ZipkinConfig"));
    }

    #[test]
    fn direction_names_the_span_kind() {
        assert_eq!(span_kind(core::TrafficDirection::Outbound as i32), SpanKind::Client);
        assert_eq!(span_kind(core::TrafficDirection::Inbound as i32), SpanKind::Server);
        assert_eq!(span_kind(core::TrafficDirection::Unspecified as i32), SpanKind::Server);
    }
}
