//! Envoy's adaptive concurrency filter
//! (envoy.extensions.filters.http.adaptive_concurrency.v3.AdaptiveConcurrency) →
//! model::adaptive_concurrency, with Envoy's defaults and its validation rules by field.

use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::extensions::filters::http::adaptive_concurrency::v3 as ac;
use envoy_types::pb::envoy::r#type::v3::Percent;
use envoy_types::pb::google::protobuf::{Any, UInt32Value};
use http::StatusCode;

use super::common::{duration, unpack};
use super::{At, FieldError, FieldResult};
use crate::model::adaptive_concurrency::AdaptiveConcurrency;
use crate::policy::adaptive_concurrency::{GradientController, GradientSettings, MinRttSource};
use crate::telemetry::metrics::Metrics;

pub(crate) const ADAPTIVE_CONCURRENCY_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.adaptive_concurrency.v3.AdaptiveConcurrency";

/// `stat_prefix`: the connection manager's, under which Envoy counts the filter too.
pub(crate) fn adaptive_concurrency(any: &Any, stat_prefix: &str, metrics: &Metrics) -> FieldResult<Arc<AdaptiveConcurrency>> {
    let c: ac::AdaptiveConcurrency = unpack(any, ADAPTIVE_CONCURRENCY_TYPE)?;
    let Some(ac::adaptive_concurrency::ConcurrencyControllerConfig::GradientControllerConfig(g)) = &c.concurrency_controller_config else {
        return Err(FieldError::new("gradient_controller_config", "is required"));
    };
    let gradient = gradient_settings(g).at("gradient_controller_config")?;
    // A feature flag names a runtime key; meshctl has no runtime, so it reads as its default.
    let enabled = match &c.enabled {
        Some(flag) => flag.default_value.as_ref().ok_or_else(|| FieldError::new("enabled.default_value", "is required"))?.value,
        None => true,
    };
    // Envoy: a status below 400 (or none) is 503.
    let limit_exceeded_status = match c.concurrency_limit_exceeded_status.as_ref().map_or(0, |s| s.code) {
        code if code < 400 => StatusCode::SERVICE_UNAVAILABLE,
        code => u16::try_from(code)
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
            .ok_or_else(|| FieldError::new("concurrency_limit_exceeded_status.code", format!("{code} is not an HTTP status")))?,
    };
    let controller = GradientController::new(gradient.clone(), metrics.adaptive_concurrency(stat_prefix), Instant::now());
    Ok(Arc::new(AdaptiveConcurrency { enabled, limit_exceeded_status, gradient, controller }))
}

fn gradient_settings(g: &ac::GradientControllerConfig) -> FieldResult<GradientSettings> {
    let percentile = percent(g.sample_aggregate_percentile.as_ref(), 50.0).at("sample_aggregate_percentile")?;
    let limits = g.concurrency_limit_params.as_ref().ok_or_else(|| FieldError::new("concurrency_limit_params", "is required"))?;
    let max_limit = positive(limits.max_concurrency_limit.as_ref(), 1000).at("concurrency_limit_params.max_concurrency_limit")?;
    let update_interval = limits
        .concurrency_update_interval
        .as_ref()
        .ok_or_else(|| FieldError::new("concurrency_limit_params.concurrency_update_interval", "is required"))
        .and_then(|d| duration(d).at("concurrency_limit_params.concurrency_update_interval"))?;
    if update_interval.is_zero() {
        return Err(FieldError::new("concurrency_limit_params.concurrency_update_interval", "must be more than 0s"));
    }
    let rtt = g.min_rtt_calc_params.as_ref().ok_or_else(|| FieldError::new("min_rtt_calc_params", "is required"))?;
    let min_concurrency = positive(rtt.min_concurrency.as_ref(), 3).at("min_rtt_calc_params.min_concurrency")?;
    // Envoy accepts a lower bound above max_concurrency_limit; the lower bound then wins.
    let min_limit = positive(limits.min_concurrency_limit.as_ref(), min_concurrency).at("concurrency_limit_params.min_concurrency_limit")?;
    let interval = match &rtt.interval {
        Some(d) => duration(d).at("min_rtt_calc_params.interval")?,
        None => Duration::from_secs(60),
    };
    let fixed = rtt.fixed_value.as_ref().map(|d| duration(d).at("min_rtt_calc_params.fixed_value")).transpose()?;
    let min_rtt = match (interval.is_zero(), fixed) {
        (true, Some(value)) if !value.is_zero() => MinRttSource::Fixed { value },
        (true, _) => {
            return Err(FieldError::new(
                "min_rtt_calc_params.fixed_value",
                "must be set (above 0s) when interval is 0s (the minimum RTT is then not measured)",
            ))
        }
        (false, _) => MinRttSource::Sampled {
            interval,
            request_count: positive(rtt.request_count.as_ref(), 50).at("min_rtt_calc_params.request_count")?,
            jitter: percent(rtt.jitter.as_ref(), 15.0).at("min_rtt_calc_params.jitter")?,
        },
    };
    Ok(GradientSettings {
        percentile,
        max_limit,
        min_limit,
        update_interval,
        min_rtt,
        min_concurrency,
        buffer: percent(rtt.buffer.as_ref(), 25.0).at("min_rtt_calc_params.buffer")?,
    })
}

/// A Percent (0 to 100) as a fraction; `default` when unset.
fn percent(p: Option<&Percent>, default: f64) -> FieldResult<f64> {
    let value = p.map_or(default, |p| p.value);
    if !(0.0..=100.0).contains(&value) {
        return Err(FieldError::new("value", format!("{value} is not a percentage between 0 and 100")));
    }
    Ok(value / 100.0)
}

fn positive(v: Option<&UInt32Value>, default: u32) -> FieldResult<u32> {
    match v.map_or(default, |v| v.value) {
        0 => Err(FieldError::new("", "must be above 0")),
        value => Ok(value),
    }
}
