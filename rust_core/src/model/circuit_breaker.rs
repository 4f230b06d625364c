//! A cluster's circuit breakers (Envoy's `circuit_breakers.thresholds`, DEFAULT priority).

use serde::Serialize;

/// Limits on what one cluster may have open at once; over a limit, the request fails at once
/// (503, flag UO) instead of queueing without bound.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CircuitBreakers {
    /// Upstream connections, all endpoints together.
    pub max_connections: u64,
    /// Requests waiting for a connection (to be opened, or to come free).
    pub max_pending_requests: u64,
    /// Requests in flight on a connection.
    pub max_requests: u64,
    pub retries: RetryLimit,
}

/// How many retries may be in flight at once.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RetryLimit {
    /// max_retries.
    Fixed { max_retries: u64 },
    /// retry_budget: a share of the requests active and pending, never below a floor.
    Budget { budget_percent: f64, min_retry_concurrency: u64 },
}

impl Default for CircuitBreakers {
    /// Envoy's thresholds when a cluster sets none: they apply to every cluster.
    fn default() -> Self {
        CircuitBreakers {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
            retries: RetryLimit::Fixed { max_retries: 3 },
        }
    }
}

impl RetryLimit {
    /// The retries allowed in flight when `active` requests are active or pending.
    pub fn max(&self, active: u64) -> u64 {
        match *self {
            RetryLimit::Fixed { max_retries } => max_retries,
            RetryLimit::Budget { budget_percent, min_retry_concurrency } => {
                ((budget_percent / 100.0 * active as f64) as u64).max(min_retry_concurrency)
            }
        }
    }
}
