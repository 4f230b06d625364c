//! RetryPolicy (route and virtual host) → model::retry::RetryPolicy.

use std::time::Duration;

use envoy_types::pb::envoy::config::route::v3 as route;

use super::common::duration;
use super::route::header_matcher;
use super::{refuse_if, At, FieldError, FieldResult};
use crate::model::retry::{RetryBackoff, RetryOn, RetryPolicy};

const PREVIOUS_HOSTS: &str = "envoy.retry_host_predicates.previous_hosts";
const PREVIOUS_HOSTS_TYPE: &str = "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate";

/// Picks beyond this are not made: with every endpoint already tried, Envoy would go on
/// picking them (and then take the last) as often as configured; meshctl stops earlier and
/// also takes the last. Only the CPU spent differs.
const MAX_HOST_SELECTION_ATTEMPTS: i64 = 100;

pub(crate) fn retry_policy(p: &route::RetryPolicy) -> FieldResult<RetryPolicy> {
    refuse_if(p.per_try_idle_timeout.is_some(), "per_try_idle_timeout")?;
    refuse_if(p.retry_priority.is_some(), "retry_priority")?;
    refuse_if(!p.retry_options_predicates.is_empty(), "retry_options_predicates")?;
    refuse_if(p.rate_limited_retry_back_off.is_some(), "rate_limited_retry_back_off")?;
    refuse_if(!p.retriable_headers.is_empty(), "retriable_headers")?;
    refuse_if(p.refresh_cluster_on_retry, "refresh_cluster_on_retry")?;
    let retry_on = retry_on(&p.retry_on).at("retry_on")?;
    // As Envoy, a code no response can have is accepted and matches nothing.
    let retriable_status_codes = p.retriable_status_codes.iter().filter_map(|code| u16::try_from(*code).ok()).collect();
    let mut avoid_previous_hosts = false;
    for (i, predicate) in p.retry_host_predicate.iter().enumerate() {
        host_predicate(predicate).at(format!("retry_host_predicate[{i}]"))?;
        avoid_previous_hosts = true;
    }
    let per_try_timeout = match &p.per_try_timeout {
        // Envoy: 0 (or unset) leaves each try bounded by the route's timeout alone.
        Some(d) => Some(duration(d).at("per_try_timeout")?).filter(|d| !d.is_zero()),
        None => None,
    };
    let backoff = match &p.retry_back_off {
        Some(b) => retry_back_off(b).at("retry_back_off")?,
        None => RetryBackoff::default(),
    };
    let retriable_request_headers = p
        .retriable_request_headers
        .iter()
        .enumerate()
        .map(|(i, h)| header_matcher(h).at(format!("retriable_request_headers[{i}]")))
        .collect::<FieldResult<Vec<_>>>()?;
    Ok(RetryPolicy {
        retry_on,
        retriable_status_codes,
        num_retries: p.num_retries.as_ref().map(|n| n.value).unwrap_or(1),
        per_try_timeout,
        avoid_previous_hosts,
        host_selection_retry_max_attempts: p.host_selection_retry_max_attempts.clamp(0, MAX_HOST_SELECTION_ATTEMPTS) as u32,
        backoff,
        retriable_request_headers,
    })
}

/// Envoy's comma-separated list; blanks around names are ignored as Envoy ignores them.
fn retry_on(list: &str) -> FieldResult<RetryOn> {
    let mut conditions = RetryOn::default();
    for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        match RetryOn::NAMES.iter().find(|(known, _)| *known == name) {
            Some((_, bit)) => conditions |= *bit,
            None if name == "retriable-headers" => {
                return Err(FieldError::new("", "retriable-headers is not supported by meshctl yet"))
            }
            None => return Err(FieldError::new("", format!("unknown retry condition {name:?}"))),
        }
    }
    Ok(conditions)
}

fn host_predicate(predicate: &route::retry_policy::RetryHostPredicate) -> FieldResult<()> {
    use route::retry_policy::retry_host_predicate::ConfigType;
    // Envoy finds the extension by its config's type, else by name.
    let known = match &predicate.config_type {
        Some(ConfigType::TypedConfig(any)) => any.type_url == PREVIOUS_HOSTS_TYPE,
        None => predicate.name == PREVIOUS_HOSTS,
    };
    if known {
        Ok(())
    } else {
        Err(FieldError::new("", format!("only {PREVIOUS_HOSTS} is supported by meshctl (got {:?})", predicate.name)))
    }
}

fn retry_back_off(b: &route::retry_policy::RetryBackOff) -> FieldResult<RetryBackoff> {
    // Envoy counts backoff in whole milliseconds; a base below one would be none at all.
    let millis = |d: Duration, field: &str| {
        if d < Duration::from_millis(1) {
            Err(FieldError::new(field, "must be at least 1ms"))
        } else {
            Ok(Duration::from_millis(d.as_millis() as u64))
        }
    };
    let base = b.base_interval.as_ref().ok_or_else(|| FieldError::new("base_interval", "is required"))?;
    let base_interval = millis(duration(base).at("base_interval")?, "base_interval")?;
    let max_interval = match &b.max_interval {
        Some(d) => millis(duration(d).at("max_interval")?, "max_interval")?,
        None => base_interval * 10,
    };
    if max_interval < base_interval {
        return Err(FieldError::new("max_interval", "must be greater than or equal to base_interval"));
    }
    Ok(RetryBackoff { base_interval, max_interval })
}
