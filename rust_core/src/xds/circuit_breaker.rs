//! A cluster's circuit_breakers → model::circuit_breaker::CircuitBreakers.

use envoy_types::pb::envoy::config::cluster::v3 as cluster;

use super::common::duration;
use super::{refuse_if, At, FieldError, FieldResult};
use crate::model::circuit_breaker::{CircuitBreakers, RetryLimit};

/// RoutingPriority DEFAULT; HIGH (1) would apply to routes of priority HIGH, which meshctl refuses.
const DEFAULT_PRIORITY: i32 = 0;

pub(crate) fn circuit_breakers(c: &cluster::CircuitBreakers) -> FieldResult<CircuitBreakers> {
    refuse_if(!c.per_host_thresholds.is_empty(), "per_host_thresholds")?;
    let mut chosen = None;
    for (i, t) in c.thresholds.iter().enumerate() {
        let at = format!("thresholds[{i}]");
        if t.priority != DEFAULT_PRIORITY {
            return Err(FieldError::new(format!("{at}.priority"), "only DEFAULT is supported by meshctl yet"));
        }
        let decoded = thresholds(t).at(&at)?;
        // Envoy uses the first thresholds of a priority.
        chosen.get_or_insert(decoded);
    }
    Ok(chosen.unwrap_or_default())
}

fn thresholds(t: &cluster::circuit_breakers::Thresholds) -> FieldResult<CircuitBreakers> {
    // track_remaining only adds remaining_* gauges, which meshctl does not have: ignored.
    refuse_if(t.max_connection_pools.is_some(), "max_connection_pools")?;
    let defaults = CircuitBreakers::default();
    let or = |value: Option<&envoy_types::pb::google::protobuf::UInt32Value>, default: u64| value.map_or(default, |v| v.value as u64);
    let retries = match &t.retry_budget {
        // A budget replaces max_retries, as in Envoy.
        Some(budget) => {
            if let Some(interval) = &budget.budget_interval {
                refuse_if(!duration(interval).at("retry_budget.budget_interval")?.is_zero(), "retry_budget.budget_interval")?;
            }
            let budget_percent = budget.budget_percent.as_ref().map_or(20.0, |p| p.value);
            if !(0.0..=100.0).contains(&budget_percent) {
                return Err(FieldError::new("retry_budget.budget_percent", "must be within [0, 100]"));
            }
            let min_retry_concurrency = budget.min_retry_concurrency.as_ref().map_or(3, |v| v.value as u64);
            RetryLimit::Budget { budget_percent, min_retry_concurrency }
        }
        None => RetryLimit::Fixed { max_retries: or(t.max_retries.as_ref(), 3) },
    };
    Ok(CircuitBreakers {
        max_connections: or(t.max_connections.as_ref(), defaults.max_connections),
        max_pending_requests: or(t.max_pending_requests.as_ref(), defaults.max_pending_requests),
        max_requests: or(t.max_requests.as_ref(), defaults.max_requests),
        retries,
    })
}
