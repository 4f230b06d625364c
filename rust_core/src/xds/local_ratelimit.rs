//! Envoy's HTTP local rate limit filter (LocalRateLimit, on the connection manager and per route
//! config / virtual host / route) and route / virtual-host rate_limits → model::local_ratelimit.
//! What meshctl does not implement is refused by field.

use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::route::v3 as route;
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3 as lrl;
use envoy_types::pb::envoy::r#type::v3::TokenBucket;
use envoy_types::pb::google::protobuf::Any;
use http::StatusCode;

use super::common::{duration, header_mutation, unpack};
use super::fault::share;
use super::route::header_matcher;
use super::{refuse_if, At, FieldError, FieldResult};
use crate::model::fault::Share;
use crate::model::local_ratelimit::{LocalRateLimit, RateLimitAction, RateLimitPolicy, VhRateLimits};
use crate::policy::local_ratelimit::BucketSpec;
use crate::telemetry::metrics::Metrics;

pub(crate) const LOCAL_RATELIMIT_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit";

/// Envoy refuses a fill_interval below this (its refill granularity).
const MIN_FILL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);

/// `per_route`: a route config's, virtual host's or route's config, which Envoy requires to have
/// a token bucket (only the connection manager's may go without, as a switch for the others).
pub(crate) fn local_rate_limit(any: &Any, per_route: bool, metrics: &Metrics) -> FieldResult<Arc<LocalRateLimit>> {
    let c: lrl::LocalRateLimit = unpack(any, LOCAL_RATELIMIT_TYPE)?;
    if c.stat_prefix.is_empty() {
        return Err(FieldError::new("stat_prefix", "is required"));
    }
    refuse_if(c.local_cluster_rate_limit.is_some(), "local_cluster_rate_limit")?;
    refuse_if(c.max_dynamic_descriptors.is_some(), "max_dynamic_descriptors")?;
    refuse_if(c.enable_retry_after_header, "enable_retry_after_header")?;
    match c.enable_x_ratelimit_headers {
        0 => {}
        1 => return Err(FieldError::new("enable_x_ratelimit_headers", "DRAFT_VERSION_03 is not supported by meshctl yet")),
        other => return Err(FieldError::new("enable_x_ratelimit_headers", format!("unknown value {other}"))),
    }
    if c.stage > 10 {
        return Err(FieldError::new("stage", "must be between 0 and 10"));
    }
    let token_bucket = c.token_bucket.as_ref().map(bucket).transpose().at("token_bucket")?;
    if per_route && token_bucket.is_none() {
        return Err(FieldError::new("token_bucket", "is required in a per-route (typed_per_filter_config) config"));
    }
    let status = match c.status.as_ref().map(|s| s.code).unwrap_or(0) {
        // Envoy's toErrorCode: an unset (or sub-400) status is 429.
        code if code < 400 => StatusCode::TOO_MANY_REQUESTS,
        code => u16::try_from(code)
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
            .ok_or_else(|| FieldError::new("status.code", format!("{code} is not an HTTP status")))?,
    };
    let mut descriptors = Vec::with_capacity(c.descriptors.len());
    for (i, d) in c.descriptors.iter().enumerate() {
        let at = format!("descriptors[{i}]");
        // A shadow descriptor counts but never limits; meshctl has no such per-descriptor mode.
        refuse_if(d.shadow_mode, "shadow_mode").at(&at)?;
        if d.entries.is_empty() {
            return Err(FieldError::new(format!("{at}.entries"), "must have at least one entry"));
        }
        let mut entries = Vec::with_capacity(d.entries.len());
        for (j, e) in d.entries.iter().enumerate() {
            if e.key.is_empty() {
                return Err(FieldError::new(format!("{at}.entries[{j}].key"), "is required"));
            }
            // An empty value is Envoy's dynamic (wildcard) descriptor, one bucket per value seen.
            if e.value.is_empty() {
                return Err(FieldError::new(
                    format!("{at}.entries[{j}].value"),
                    "an empty value (a dynamic descriptor) is not supported by meshctl yet",
                ));
            }
            entries.push((e.key.clone(), e.value.clone()));
        }
        let spec = d.token_bucket.as_ref().ok_or_else(|| FieldError::new(format!("{at}.token_bucket"), "is required"))?;
        let spec = bucket(spec).at(format!("{at}.token_bucket"))?;
        if descriptors.iter().any(|(existing, _)| *existing == entries) {
            return Err(FieldError::new(at, "duplicates an earlier descriptor"));
        }
        descriptors.push((entries, spec));
    }
    let vh_rate_limits = match c.vh_rate_limits {
        0 => VhRateLimits::Override,
        1 => VhRateLimits::Include,
        2 => VhRateLimits::Ignore,
        other => return Err(FieldError::new("vh_rate_limits", format!("unknown value {other}"))),
    };
    let rate_limits = rate_limits(&c.rate_limits).at("rate_limits")?;
    let config = LocalRateLimit {
        stats: metrics.local_rate_limit(&c.stat_prefix),
        descriptor_stats: descriptors.iter().map(|(d, _)| metrics.local_rate_limit_descriptor(&c.stat_prefix, d)).collect(),
        stat_prefix: c.stat_prefix.clone(),
        token_bucket,
        // Runtime keys name values in Envoy's runtime; meshctl has none, so each reads as its
        // default_value, as an Envoy without that key set does. Absent: 0 % (off, not enforced).
        enabled: runtime_share(c.filter_enabled.as_ref()).at("filter_enabled")?,
        enforced: runtime_share(c.filter_enforced.as_ref()).at("filter_enforced")?,
        status,
        response_headers: header_mutation(&c.response_headers_to_add, &[]).at("response_headers_to_add")?,
        request_headers_when_not_enforced: header_mutation(&c.request_headers_to_add_when_not_enforced, &[])
            .at("request_headers_to_add_when_not_enforced")?,
        per_connection: c.local_rate_limit_per_downstream_connection,
        descriptors,
        always_consume_default: c.always_consume_default_token_bucket.as_ref().is_none_or(|b| b.value),
        rate_limited_as_resource_exhausted: c.rate_limited_as_resource_exhausted,
        stage: c.stage,
        vh_rate_limits,
        rate_limits,
        limiter: crate::policy::local_ratelimit::Limiter::new(None, &[], true),
    };
    let limiter = config.make_limiter();
    Ok(Arc::new(LocalRateLimit { limiter, ..config }))
}

fn runtime_share(p: Option<&core::RuntimeFractionalPercent>) -> FieldResult<Share> {
    match p {
        Some(p) => share(p.default_value.as_ref()).at("default_value"),
        None => Ok(Share::NONE),
    }
}

fn bucket(b: &TokenBucket) -> FieldResult<BucketSpec> {
    let tokens_per_fill = b.tokens_per_fill.as_ref().map_or(1, |v| v.value);
    if tokens_per_fill == 0 {
        return Err(FieldError::new("tokens_per_fill", "must be above 0"));
    }
    let fill_interval = duration(b.fill_interval.as_ref().ok_or_else(|| FieldError::new("fill_interval", "is required"))?)
        .at("fill_interval")?;
    if fill_interval < MIN_FILL_INTERVAL {
        return Err(FieldError::new("fill_interval", "must be at least 50ms"));
    }
    Ok(BucketSpec { max_tokens: b.max_tokens, tokens_per_fill, fill_interval })
}

/// A route's or virtual host's rate_limits (the same shape serves the filter's own rate_limits).
pub(crate) fn rate_limits(limits: &[route::RateLimit]) -> FieldResult<Vec<RateLimitPolicy>> {
    limits.iter().enumerate().map(|(i, r)| rate_limit(r).at(format!("[{i}]"))).collect()
}

fn rate_limit(r: &route::RateLimit) -> FieldResult<RateLimitPolicy> {
    refuse_if(r.limit.is_some(), "limit")?;
    refuse_if(r.hits_addend.is_some(), "hits_addend")?;
    refuse_if(r.apply_on_stream_done, "apply_on_stream_done")?;
    let stage = r.stage.as_ref().map_or(0, |s| s.value);
    if stage > 10 {
        return Err(FieldError::new("stage", "must be between 0 and 10"));
    }
    if r.actions.is_empty() {
        return Err(FieldError::new("actions", "must have at least one action"));
    }
    let actions = r.actions.iter().enumerate().map(|(i, a)| action(a).at(format!("actions[{i}]"))).collect::<FieldResult<_>>()?;
    Ok(RateLimitPolicy { stage, disabled: !r.disable_key.is_empty(), actions })
}

fn action(a: &route::rate_limit::Action) -> FieldResult<RateLimitAction> {
    use route::rate_limit::action::ActionSpecifier as A;
    Ok(match &a.action_specifier {
        Some(A::RequestHeaders(h)) => {
            if h.header_name.is_empty() || h.descriptor_key.is_empty() {
                return Err(FieldError::new("request_headers", "header_name and descriptor_key are required"));
            }
            RateLimitAction::RequestHeaders {
                header_name: h.header_name.to_ascii_lowercase(),
                descriptor_key: h.descriptor_key.clone(),
                skip_if_absent: h.skip_if_absent,
            }
        }
        Some(A::RemoteAddress(_)) => RateLimitAction::RemoteAddress,
        Some(A::GenericKey(g)) => {
            refuse_if(!g.default_value.is_empty(), "generic_key.default_value")?;
            if g.descriptor_value.is_empty() {
                return Err(FieldError::new("generic_key.descriptor_value", "is required"));
            }
            RateLimitAction::GenericKey {
                descriptor_key: if g.descriptor_key.is_empty() { "generic_key".into() } else { g.descriptor_key.clone() },
                descriptor_value: g.descriptor_value.clone(),
            }
        }
        Some(A::HeaderValueMatch(m)) => {
            refuse_if(!m.default_value.is_empty(), "header_value_match.default_value")?;
            if m.descriptor_value.is_empty() {
                return Err(FieldError::new("header_value_match.descriptor_value", "is required"));
            }
            if m.headers.is_empty() {
                return Err(FieldError::new("header_value_match.headers", "must have at least one matcher"));
            }
            let headers = m
                .headers
                .iter()
                .enumerate()
                .map(|(i, h)| header_matcher(h).at(format!("header_value_match.headers[{i}]")))
                .collect::<FieldResult<_>>()?;
            RateLimitAction::HeaderValueMatch {
                descriptor_key: if m.descriptor_key.is_empty() { "header_match".into() } else { m.descriptor_key.clone() },
                descriptor_value: m.descriptor_value.clone(),
                expect_match: m.expect_match.as_ref().is_none_or(|b| b.value),
                headers,
            }
        }
        Some(A::DestinationCluster(_)) => RateLimitAction::DestinationCluster,
        Some(A::SourceCluster(_)) => return Err(FieldError::unsupported("source_cluster")),
        Some(A::QueryParameters(_)) => return Err(FieldError::unsupported("query_parameters")),
        #[allow(deprecated)]
        Some(A::DynamicMetadata(_)) => return Err(FieldError::unsupported("dynamic_metadata")),
        Some(A::Metadata(_)) => return Err(FieldError::unsupported("metadata")),
        Some(A::Extension(_)) => return Err(FieldError::unsupported("extension")),
        Some(A::MaskedRemoteAddress(_)) => return Err(FieldError::unsupported("masked_remote_address")),
        Some(A::RemoteAddressMatch(_)) => return Err(FieldError::unsupported("remote_address_match")),
        Some(A::QueryParameterValueMatch(_)) => return Err(FieldError::unsupported("query_parameter_value_match")),
        None => return Err(FieldError::new("", "an action needs one action specifier")),
    })
}
