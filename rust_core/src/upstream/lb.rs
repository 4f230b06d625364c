//! Load-balancing choices: weighted round robin, least request (power of two choices), random,
//! over a cluster's healthy endpoints, or all of them in panic mode (as Envoy's balancers).

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use super::cluster::Endpoint;
use crate::model::route::pick_index;
use crate::model::LbPolicy;

/// Envoy's default overprovisioning factor (percent): a priority with at least 1/1.4 of its
/// hosts healthy counts as fully available, and never panics.
const OVERPROVISIONING_FACTOR: usize = 140;

/// The endpoints of a cluster as one immutable set, with what the balancer needs precomputed.
/// Rebuilt whenever an endpoint's health changes, so picking reads no health state.
#[derive(Debug, Default)]
pub struct EndpointSet {
    /// Every endpoint of the cluster, healthy or not, in configuration order.
    pub endpoints: Vec<Arc<Endpoint>>,
    /// The healthy endpoints when some are not (and the set is not in panic); None: all of them.
    healthy: Option<Vec<Arc<Endpoint>>>,
    /// Running sums of the weights of the endpoints picked from; None when all weights are equal.
    cumulative_weights: Option<Vec<u64>>,
    /// Too few endpoints are healthy: every endpoint takes traffic (Envoy's panic mode).
    pub panic: bool,
}

impl EndpointSet {
    /// `panic_threshold`: the percentage of healthy endpoints below which all of them are used.
    pub fn new(endpoints: Vec<Arc<Endpoint>>, panic_threshold: u32) -> Self {
        let total = endpoints.len();
        let healthy_count = endpoints.iter().filter(|e| e.is_healthy()).count();
        let panic = healthy_count < total && in_panic(healthy_count, total, panic_threshold);
        let healthy = (healthy_count < total && !panic)
            .then(|| endpoints.iter().filter(|e| e.is_healthy()).cloned().collect::<Vec<_>>());
        let chosen = healthy.as_deref().unwrap_or(&endpoints);
        let uniform = chosen.windows(2).all(|w| w[0].weight == w[1].weight);
        let cumulative_weights =
            (!uniform).then(|| crate::model::route::cumulative_weights(chosen.iter().map(|e| e.weight as u64)));
        EndpointSet { endpoints, healthy, cumulative_weights, panic }
    }

    /// The endpoints the balancer picks from.
    fn candidates(&self) -> &[Arc<Endpoint>] {
        self.healthy.as_deref().unwrap_or(&self.endpoints)
    }

    pub fn pick(&self, policy: LbPolicy, rotation: &AtomicUsize) -> Option<&Arc<Endpoint>> {
        let candidates = self.candidates();
        let n = candidates.len();
        if n <= 1 {
            return candidates.first();
        }
        let index = match policy {
            LbPolicy::RoundRobin => match &self.cumulative_weights {
                None => rotation.fetch_add(1, Relaxed) % n,
                Some(sums) => {
                    let total = *sums.last().unwrap();
                    pick_index(sums, rotation.fetch_add(1, Relaxed) as u64 % total)
                }
            },
            LbPolicy::Random => self.weighted_random(n),
            LbPolicy::LeastRequest => {
                let a = self.weighted_random(n);
                let b = self.weighted_random(n);
                if candidates[b].active_requests() < candidates[a].active_requests() {
                    b
                } else {
                    a
                }
            }
        };
        candidates.get(index)
    }

    fn weighted_random(&self, n: usize) -> usize {
        match &self.cumulative_weights {
            None => fastrand::usize(..n),
            Some(sums) => pick_index(sums, fastrand::u64(..*sums.last().unwrap())),
        }
    }
}

/// Envoy's panic decision for a single priority: never while its availability (healthy share ×
/// the overprovisioning factor, capped at 100) is full; otherwise when the healthy share is below
/// the threshold. A threshold of 0 never panics, even with no healthy endpoint.
fn in_panic(healthy: usize, total: usize, threshold: u32) -> bool {
    if total == 0 || threshold == 0 {
        return false;
    }
    let availability = (OVERPROVISIONING_FACTOR * healthy / total).min(100);
    availability < 100 && (100.0 * healthy as f64 / total as f64) < threshold.min(100) as f64
}

#[cfg(test)]
mod tests {
    use super::in_panic;

    #[test]
    fn panic_follows_envoys_rule() {
        // Half healthy is not below 50%; fewer is.
        assert!(!in_panic(1, 2, 50));
        assert!(in_panic(0, 2, 50));
        assert!(in_panic(4, 10, 50));
        // Threshold 0: never, even with nothing healthy.
        assert!(!in_panic(0, 2, 0));
        // 75% healthy is fully available after overprovisioning (105%): no panic even at 80.
        assert!(!in_panic(3, 4, 80));
        assert!(in_panic(7, 10, 80));
        assert!(!in_panic(1, 1, 100));
    }
}
