//! A cluster's fallback at run time: its config, its destination breaker (state kept for as long
//! as the cluster's config is unchanged) and the counters of the host it guards.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use super::destination_breaker::{Admission, DestinationBreaker};
use crate::model::fallback::{FallbackConfig, FallbackReason};
use crate::telemetry::metrics::{ClusterStats, Metrics};
use crate::telemetry::resilience::FallbackStats;

#[derive(Debug)]
pub struct ClusterFallback {
    pub config: Arc<FallbackConfig>,
    pub breaker: Option<DestinationBreaker>,
    stats: Arc<FallbackStats>,
    /// The guarded cluster's own counters: its requests a fallback answered count there too,
    /// so a version's failure rate (route shift) includes what its breaker kept from it.
    cluster_stats: Arc<ClusterStats>,
}

impl ClusterFallback {
    pub fn new(config: Arc<FallbackConfig>, cluster: &str, metrics: &Metrics) -> Self {
        let gauge = metrics.fallback_breaker_gauge(cluster);
        let breaker = config.breaker.clone().map(|breaker| DestinationBreaker::new(breaker, gauge, Instant::now()));
        let stats = metrics.fallback(&config.host);
        ClusterFallback { config, breaker, stats, cluster_stats: metrics.cluster(cluster) }
    }

    /// Whether the breaker lets a request through; None without a breaker.
    pub fn admit(&self) -> Option<Admission> {
        self.breaker.as_ref().map(|breaker| breaker.admit(Instant::now()))
    }

    pub fn applies_on(&self, reason: FallbackReason) -> bool {
        self.config.applies_on(reason)
    }

    pub fn count(&self, reason: FallbackReason) {
        self.stats.count(reason);
        self.cluster_stats.resilience.fallbacks.fetch_add(1, Relaxed);
    }
}
