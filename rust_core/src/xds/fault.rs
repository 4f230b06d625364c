//! Envoy's HTTP fault filter (HTTPFault, on the connection manager and per route) and a route's
//! request_mirror_policies → model::fault. Header-controlled faults, fault limits and rate limits
//! are not implemented and are refused.

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::route::v3::route_action::RequestMirrorPolicy;
use envoy_types::pb::envoy::extensions::filters::common::fault::v3::fault_delay::FaultDelaySecifier;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3 as fault;
use envoy_types::pb::envoy::r#type::v3::FractionalPercent;
use envoy_types::pb::google::protobuf::Any;
use http::StatusCode;

use super::common::{duration, unpack};
use super::{refuse_if, At, FieldError, FieldResult};
use crate::model::fault::{AbortStatus, FaultAbort, FaultDelay, FaultPolicy, MirrorPolicy, Share};

pub(crate) const FAULT_FILTER_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault";
/// Envoy's body for an abort whose config gives none.
const ABORT_BODY: &str = "fault filter abort";

pub(crate) fn http_fault(any: &Any) -> FieldResult<FaultPolicy> {
    let config: fault::HttpFault = unpack(any, FAULT_FILTER_TYPE)?;
    refuse_if(!config.upstream_cluster.is_empty(), "upstream_cluster")?;
    refuse_if(!config.headers.is_empty(), "headers")?;
    refuse_if(!config.downstream_nodes.is_empty(), "downstream_nodes")?;
    // Envoy's default is no limit; a limit is a behaviour meshctl does not have yet.
    refuse_if(config.max_active_faults.is_some(), "max_active_faults")?;
    refuse_if(config.response_rate_limit.is_some(), "response_rate_limit")?;
    // The *_runtime fields name runtime keys; meshctl has no runtime, so every key reads as its
    // default (the configured value), as an Envoy without that key set does.
    let delay = config.delay.as_ref().map(|d| fault_delay(d).at("delay")).transpose()?;
    let abort = config.abort.as_ref().map(|a| fault_abort(a).at("abort")).transpose()?;
    Ok(FaultPolicy { delay, abort })
}

fn fault_delay(d: &envoy_types::pb::envoy::extensions::filters::common::fault::v3::FaultDelay) -> FieldResult<FaultDelay> {
    let duration = match &d.fault_delay_secifier {
        Some(FaultDelaySecifier::FixedDelay(fixed)) => duration(fixed).at("fixed_delay")?,
        Some(FaultDelaySecifier::HeaderDelay(_)) => {
            return Err(FieldError::new(
                "header_delay",
                "is not supported by meshctl yet (delays chosen by the x-envoy-fault-delay-request header)",
            ))
        }
        None => return Err(FieldError::new("", "a delay needs fixed_delay")),
    };
    Ok(FaultDelay { duration, share: share(d.percentage.as_ref()).at("percentage")? })
}

fn fault_abort(a: &fault::FaultAbort) -> FieldResult<FaultAbort> {
    use fault::fault_abort::ErrorType;
    let status = match &a.error_type {
        Some(ErrorType::HttpStatus(code)) => AbortStatus::Http(
            u16::try_from(*code)
                .ok()
                .filter(|c| (200..600).contains(c))
                .and_then(|c| StatusCode::from_u16(c).ok())
                .ok_or_else(|| FieldError::new("http_status", format!("{code} is not an HTTP status in [200, 600)")))?,
        ),
        Some(ErrorType::GrpcStatus(code)) => AbortStatus::Grpc(*code),
        Some(ErrorType::HeaderAbort(_)) => {
            return Err(FieldError::new(
                "header_abort",
                "is not supported by meshctl yet (aborts chosen by the x-envoy-fault-abort-request header)",
            ))
        }
        None => return Err(FieldError::new("", "an abort needs http_status or grpc_status")),
    };
    let body = if a.response_body.is_empty() { ABORT_BODY.to_string() } else { a.response_body.clone() };
    Ok(FaultAbort { status, share: share(a.percentage.as_ref()).at("percentage")?, body })
}

/// Envoy's FractionalPercent in millionths; a missing one is 0 (Envoy's default numerator), and
/// a numerator above its denominator is capped at 100 %.
pub(crate) fn share(fraction: Option<&FractionalPercent>) -> FieldResult<Share> {
    let Some(fraction) = fraction else { return Ok(Share::NONE) };
    let scale = match fraction.denominator {
        0 => 10_000,
        1 => 100,
        2 => 1,
        other => return Err(FieldError::new("denominator", format!("unknown value {other}"))),
    };
    Ok(Share { per_million: fraction.numerator.saturating_mul(scale).min(1_000_000) })
}

pub(crate) fn mirror_policy(p: &RequestMirrorPolicy) -> FieldResult<MirrorPolicy> {
    if p.cluster.is_empty() {
        return Err(FieldError::new("cluster", "is required (cluster_header is not supported by meshctl yet)"));
    }
    refuse_if(!p.cluster_header.is_empty(), "cluster_header")?;
    refuse_if(!p.request_headers_mutations.is_empty(), "request_headers_mutations")?;
    refuse_if(!p.host_rewrite_literal.is_empty(), "host_rewrite_literal")?;
    // trace_sampled only marks the copy's trace; meshctl does not trace yet, so it changes nothing.
    let share = match &p.runtime_fraction {
        Some(core::RuntimeFractionalPercent { default_value, .. }) => {
            share(default_value.as_ref()).at("runtime_fraction.default_value")?
        }
        // Without runtime_fraction Envoy mirrors every request.
        None => Share::ALL,
    };
    Ok(MirrorPolicy { cluster: p.cluster.clone(), share, shadow_host_suffix: !p.disable_shadow_host_suffix_append })
}
