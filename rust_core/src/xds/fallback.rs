//! A cluster's `meshctl.fallback` metadata (compiled from meshctl's Fallback resource) → the
//! model's FallbackConfig. Envoy keeps such metadata and ignores it; meshctl enforces it, so a
//! malformed one is refused here like any other field.

use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Metadata;
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
use http::header::{HeaderName, HeaderValue};
use http::StatusCode;
use serde::Deserialize;

use super::{At, FieldError, FieldResult};
use crate::model::fallback::{BreakerConfig, FallbackConfig, FallbackReason, FallbackTarget};

pub(crate) const METADATA_KEY: &str = "meshctl.fallback";
/// Fallback bodies are answered from memory on every request that falls back.
const BODY_LIMIT: usize = 64 * 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    fallback: String,
    host: String,
    on: Vec<String>,
    breaker: Option<WireBreaker>,
    cluster: Option<String>,
    response: Option<WireResponse>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireBreaker {
    error_ratio: Option<f64>,
    slow_call_ratio: Option<f64>,
    slow_call_duration_ms: Option<f64>,
    min_requests: f64,
    window_ms: f64,
    open_for_ms: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireResponse {
    status: f64,
    #[serde(default)]
    headers: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    body: String,
}

/// The fallback in a cluster's metadata; None when it has none (other keys are not ours).
pub(crate) fn fallback(metadata: Option<&Metadata>) -> FieldResult<Option<FallbackConfig>> {
    let Some(found) = metadata.and_then(|m| m.filter_metadata.get(METADATA_KEY)) else { return Ok(None) };
    let at = format!("filter_metadata[{METADATA_KEY:?}]");
    let wire: Wire = serde_json::from_value(struct_to_json(found)).map_err(|e| FieldError::new("", e.to_string())).at(&at)?;
    decode(wire).map(Some).at(&at)
}

fn decode(wire: Wire) -> FieldResult<FallbackConfig> {
    let mut on = 0;
    for name in &wire.on {
        let reason = FallbackReason::parse(name).ok_or_else(|| FieldError::new("on", format!("unknown reason {name:?}")))?;
        on |= reason.bit();
    }
    let breaker = wire.breaker.map(breaker).transpose()?;
    if (on & FallbackReason::BreakerOpen.bit() != 0) != breaker.is_some() {
        return Err(FieldError::new("on", "breaker-open and a breaker go together"));
    }
    let target = match (wire.cluster, wire.response) {
        (Some(cluster), None) if !cluster.is_empty() => FallbackTarget::Cluster(cluster),
        (None, Some(response)) => response_target(response)?,
        _ => return Err(FieldError::new("", "needs exactly one of cluster and response")),
    };
    Ok(FallbackConfig { fallback: wire.fallback, host: wire.host, on, breaker, target })
}

fn breaker(wire: WireBreaker) -> FieldResult<BreakerConfig> {
    let ratio = |name: &str, value: Option<f64>| match value {
        Some(r) if !(r > 0.0 && r <= 1.0) => Err(FieldError::new(format!("breaker.{name}"), "must be in (0, 1]")),
        other => Ok(other),
    };
    let error_ratio = ratio("error_ratio", wire.error_ratio)?;
    let slow_call_ratio = ratio("slow_call_ratio", wire.slow_call_ratio)?;
    if error_ratio.is_none() && slow_call_ratio.is_none() {
        return Err(FieldError::new("breaker", "needs error_ratio or slow_call_ratio"));
    }
    let slow_call_duration = wire.slow_call_duration_ms.map(|ms| millis("breaker.slow_call_duration_ms", ms)).transpose()?;
    if slow_call_ratio.is_some() != slow_call_duration.is_some() {
        return Err(FieldError::new("breaker.slow_call_duration_ms", "goes with slow_call_ratio"));
    }
    if !(wire.min_requests >= 1.0 && wire.min_requests <= 1e6 && wire.min_requests.fract() == 0.0) {
        return Err(FieldError::new("breaker.min_requests", "must be a whole number from 1 to 1000000"));
    }
    Ok(BreakerConfig {
        error_ratio,
        slow_call_ratio,
        slow_call_duration,
        min_requests: wire.min_requests as u32,
        window: millis("breaker.window_ms", wire.window_ms)?,
        open_for: millis("breaker.open_for_ms", wire.open_for_ms)?,
    })
}

fn millis(field: &str, value: f64) -> FieldResult<Duration> {
    // Up to a day: a breaker window or open time longer than that is a mistake.
    if !(value >= 1.0 && value <= 86_400_000.0) {
        return Err(FieldError::new(field, "must be from 1 ms to 24 h"));
    }
    Ok(Duration::from_millis(value as u64))
}

fn response_target(wire: WireResponse) -> FieldResult<FallbackTarget> {
    if StatusCode::from_u16(wire.status as u16).is_err() || wire.status.fract() != 0.0 || !(200.0..=599.0).contains(&wire.status) {
        return Err(FieldError::new("response.status", "must be an HTTP status from 200 to 599"));
    }
    for (name, value) in &wire.headers {
        HeaderName::from_bytes(name.as_bytes()).map_err(|_| FieldError::new(format!("response.headers[{name:?}]"), "not a header name"))?;
        HeaderValue::from_str(value).map_err(|_| FieldError::new(format!("response.headers[{name:?}]"), "not a header value"))?;
    }
    if wire.body.len() > BODY_LIMIT {
        return Err(FieldError::new("response.body", format!("longer than {BODY_LIMIT} bytes")));
    }
    Ok(FallbackTarget::Response { status: wire.status as u16, headers: wire.headers.into_iter().collect(), body: wire.body })
}

pub(crate) fn struct_to_json(value: &Struct) -> serde_json::Value {
    serde_json::Value::Object(value.fields.iter().map(|(k, v)| (k.clone(), value_to_json(v))).collect())
}

fn value_to_json(value: &Value) -> serde_json::Value {
    match &value.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::NumberValue(n)) => serde_json::Number::from_f64(*n).map_or(serde_json::Value::Null, serde_json::Value::Number),
        Some(Kind::StringValue(s)) => serde_json::Value::String(s.clone()),
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(*b),
        Some(Kind::StructValue(s)) => struct_to_json(s),
        Some(Kind::ListValue(list)) => serde_json::Value::Array(list.values.iter().map(value_to_json).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(document: serde_json::Value) -> Metadata {
        fn value(v: &serde_json::Value) -> Value {
            let kind = match v {
                serde_json::Value::Null => Kind::NullValue(0),
                serde_json::Value::Bool(b) => Kind::BoolValue(*b),
                serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap()),
                serde_json::Value::String(s) => Kind::StringValue(s.clone()),
                serde_json::Value::Array(a) => {
                    Kind::ListValue(envoy_types::pb::google::protobuf::ListValue { values: a.iter().map(value).collect() })
                }
                serde_json::Value::Object(o) => Kind::StructValue(Struct { fields: o.iter().map(|(k, v)| (k.clone(), value(v))).collect() }),
            };
            Value { kind: Some(kind) }
        }
        let Kind::StructValue(found) = value(&document).kind.unwrap() else { unreachable!() };
        Metadata { filter_metadata: [(METADATA_KEY.to_string(), found)].into(), ..Default::default() }
    }

    fn with(change: impl FnOnce(&mut serde_json::Value)) -> Result<Option<FallbackConfig>, String> {
        let mut document = serde_json::json!({
            "fallback": "default/reviews", "host": "reviews.default.svc.cluster.local",
            "on": ["breaker-open", "5xx"],
            "breaker": {"error_ratio": 0.5, "min_requests": 5, "window_ms": 10000, "open_for_ms": 2000},
            "response": {"status": 200, "headers": {"content-type": "application/json"}, "body": "{}"},
        });
        change(&mut document);
        fallback(Some(&metadata(document))).map_err(|e| e.into_config_error("Cluster \"c\"").to_string())
    }

    #[test]
    fn decodes_breaker_reasons_and_response() {
        let config = with(|_| {}).unwrap().unwrap();
        assert!(config.applies_on(FallbackReason::ServerError) && !config.applies_on(FallbackReason::Timeout));
        assert_eq!(config.breaker.unwrap().open_for, Duration::from_secs(2));
        assert!(matches!(config.target, FallbackTarget::Response { status: 200, .. }));
        assert_eq!(fallback(None).unwrap(), None);
    }

    #[test]
    fn refuses_what_it_cannot_enforce_naming_the_field() {
        let refused = |change: fn(&mut serde_json::Value), expected: &str| {
            let error = with(change).unwrap_err();
            assert!(error.contains(expected), "{error}");
        };
        refused(|d| d["breaker"]["error_ratio"] = 1.5.into(), "breaker.error_ratio");
        refused(|d| d["breaker"]["window_ms"] = 0.into(), "breaker.window_ms");
        refused(|d| d["on"] = serde_json::json!(["5xx", "sometimes"]), "unknown reason \"sometimes\"");
        refused(|d| d["on"] = serde_json::json!(["5xx"]), "breaker-open and a breaker go together");
        refused(|d| d["cluster"] = "outbound|9080|v1|reviews".into(), "exactly one of cluster and response");
        refused(|d| d["response"]["status"] = 99.into(), "response.status");
        refused(|d| d["response"]["headers"]["bad header"] = "x".into(), "not a header name");
        refused(|d| d["retries"] = 3.into(), "unknown field `retries`");
    }
}
