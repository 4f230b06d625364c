//! Envoy's HTTP global rate limit filter (envoy.extensions.filters.http.ratelimit.v3.RateLimit)
//! → model::global_ratelimit. What meshctl does not implement is refused by field.

use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::extensions::filters::http::ratelimit::v3 as rl;
use envoy_types::pb::google::protobuf::Any;
use http::StatusCode;

use super::common::{duration, unpack};
use super::grpc_service::envoy_grpc_target;
use super::{refuse_if, At, FieldError, FieldResult};
use crate::model::global_ratelimit::{GlobalRateLimit, RequestType};

pub(crate) const RATELIMIT_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit";

/// Envoy's default deadline for a ShouldRateLimit call.
const DEFAULT_TIMEOUT: Duration = Duration::from_millis(20);

pub(crate) fn global_rate_limit(any: &Any) -> FieldResult<Arc<GlobalRateLimit>> {
    let c: rl::RateLimit = unpack(any, RATELIMIT_TYPE)?;
    if c.domain.is_empty() {
        return Err(FieldError::new("domain", "is required"));
    }
    // Stages select which route policies a filter instance uses (meshctl's compiler puts global
    // rules at 1, local ones at 0); Envoy allows 0 to 10.
    if c.stage > 10 {
        return Err(FieldError::new("stage", format!("{} is more than 10 (Envoy's stages are 0 to 10)", c.stage)));
    }
    let request_type = match c.request_type.as_str() {
        "" | "both" => RequestType::Both,
        "internal" => RequestType::Internal,
        "external" => RequestType::External,
        other => return Err(FieldError::new("request_type", format!("{other:?} must be internal, external or both"))),
    };
    let timeout = match &c.timeout {
        Some(d) => duration(d).at("timeout")?,
        None => DEFAULT_TIMEOUT,
    };
    match c.enable_x_ratelimit_headers {
        0 => {}
        1 => return Err(FieldError::new("enable_x_ratelimit_headers", "DRAFT_VERSION_03 is not supported by meshctl yet")),
        other => return Err(FieldError::new("enable_x_ratelimit_headers", format!("unknown value {other}"))),
    }
    refuse_if(!c.response_headers_to_add.is_empty(), "response_headers_to_add")?;
    refuse_if(!c.stat_prefix.is_empty(), "stat_prefix")?;
    refuse_if(c.filter_enabled.is_some(), "filter_enabled")?;
    refuse_if(c.filter_enforced.is_some(), "filter_enforced")?;
    refuse_if(c.failure_mode_deny_percent.is_some(), "failure_mode_deny_percent")?;
    refuse_if(!c.rate_limits.is_empty(), "rate_limits")?;
    refuse_if(!c.metadata_namespace.is_empty(), "metadata_namespace")?;
    refuse_if(c.enable_retry_after_header, "enable_retry_after_header")?;
    let service = c.rate_limit_service.as_ref().ok_or_else(|| FieldError::new("rate_limit_service", "is required"))?;
    let (cluster, authority) = rate_limit_service(service).at("rate_limit_service")?;
    Ok(Arc::new(GlobalRateLimit {
        domain: c.domain.clone(),
        stage: c.stage,
        request_type,
        timeout,
        failure_mode_deny: c.failure_mode_deny,
        cluster,
        authority,
        rate_limited_status: status(c.rate_limited_status.as_ref(), StatusCode::TOO_MANY_REQUESTS).at("rate_limited_status")?,
        status_on_error: status(c.status_on_error.as_ref(), StatusCode::INTERNAL_SERVER_ERROR).at("status_on_error")?,
        rate_limited_as_resource_exhausted: c.rate_limited_as_resource_exhausted,
        omit_ratelimited_header: c.disable_x_envoy_ratelimited_header,
        quota: Default::default(),
    }))
}

/// The service's cluster and :authority (xds::grpc_service); Envoy's per-call timeout is the
/// filter's own `timeout` here, so grpc_service.timeout is refused.
fn rate_limit_service(
    s: &envoy_types::pb::envoy::config::ratelimit::v3::RateLimitServiceConfig,
) -> FieldResult<(String, http::uri::Authority)> {
    // Envoy accepts only the v3 transport API for this service.
    if s.transport_api_version != core::ApiVersion::V3 as i32 {
        return Err(FieldError::new("transport_api_version", "must be V3"));
    }
    let grpc = s.grpc_service.as_ref().ok_or_else(|| FieldError::new("grpc_service", "is required"))?;
    refuse_if(grpc.timeout.is_some(), "grpc_service.timeout")?;
    envoy_grpc_target(grpc)
}

/// Envoy's toErrorCode: unset (or below 400) is the default.
fn status(s: Option<&envoy_types::pb::envoy::r#type::v3::HttpStatus>, default: StatusCode) -> FieldResult<StatusCode> {
    match s.map(|s| s.code).unwrap_or(0) {
        code if code < 400 => Ok(default),
        code => u16::try_from(code)
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
            .ok_or_else(|| FieldError::new("code", format!("{code} is not an HTTP status"))),
    }
}
