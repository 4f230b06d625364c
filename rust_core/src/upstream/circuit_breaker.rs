//! Circuit breakers: a cluster's open connections, pending and active requests and retries,
//! counted in atomics and held by guards (Envoy's resource manager, without locks).
//!
//! The counts live in the cluster's statistics, which outlive a config change: a changed
//! cluster's new version counts what its old version still has open. Envoy starts a changed
//! cluster's counts at zero; counting what is really open protects the upstream better.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::model::circuit_breaker::CircuitBreakers;
use crate::telemetry::metrics::ClusterStats;
use crate::telemetry::resilience::ResilienceStats;

/// Take one unit of `gauge` unless `limit` units are taken already.
pub(crate) fn try_acquire(gauge: &AtomicU64, limit: u64) -> bool {
    // Counted first and given back when over: two racing takers never both pass the last unit.
    if gauge.fetch_add(1, Ordering::SeqCst) >= limit {
        gauge.fetch_sub(1, Ordering::SeqCst);
        false
    } else {
        true
    }
}

/// A retry in flight (backoff included), counted against max_retries or the retry budget until
/// its try is done.
#[derive(Debug)]
pub struct RetrySlot(std::sync::Arc<ClusterStats>);

impl RetrySlot {
    /// One retry slot of the cluster, or None when its retry breaker is open.
    pub fn acquire(limits: &CircuitBreakers, stats: &std::sync::Arc<ClusterStats>) -> Option<RetrySlot> {
        let counts: &ResilienceStats = &stats.resilience;
        // A budget is a share of what is active and pending now (Envoy's retry_budget).
        let active = counts.requests_active.load(Ordering::Relaxed) + counts.requests_pending.load(Ordering::Relaxed);
        try_acquire(&counts.retries_active, limits.retries.max(active)).then(|| RetrySlot(stats.clone()))
    }
}

impl Drop for RetrySlot {
    fn drop(&mut self) {
        self.0.resilience.retries_active.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::circuit_breaker::RetryLimit;
    use std::sync::Arc;

    #[test]
    fn a_gauge_is_never_taken_past_its_limit() {
        let gauge = AtomicU64::new(0);
        assert!(try_acquire(&gauge, 2));
        assert!(try_acquire(&gauge, 2));
        assert!(!try_acquire(&gauge, 2));
        assert_eq!(gauge.load(Ordering::SeqCst), 2);
        assert!(!try_acquire(&AtomicU64::new(0), 0));
    }

    #[test]
    fn a_retry_budget_follows_the_active_requests_above_its_floor() {
        let stats = Arc::new(ClusterStats::default());
        let limits = CircuitBreakers {
            retries: RetryLimit::Budget { budget_percent: 50.0, min_retry_concurrency: 1 },
            ..Default::default()
        };
        let first = RetrySlot::acquire(&limits, &stats).expect("the floor allows one");
        assert!(RetrySlot::acquire(&limits, &stats).is_none());
        stats.resilience.requests_active.store(4, Ordering::SeqCst);
        let second = RetrySlot::acquire(&limits, &stats).expect("half of four is two");
        assert!(RetrySlot::acquire(&limits, &stats).is_none());
        drop((first, second));
        assert_eq!(stats.resilience.retries_active.load(Ordering::SeqCst), 0);
    }
}
