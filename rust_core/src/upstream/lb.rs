//! Load-balancing choices: weighted round robin, least request (power of two choices), random.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use super::cluster::Endpoint;
use crate::model::route::pick_index;
use crate::model::LbPolicy;

/// The endpoints of a cluster as one immutable set, with what the balancer needs precomputed.
#[derive(Debug, Default)]
pub struct EndpointSet {
    pub endpoints: Vec<Arc<Endpoint>>,
    /// Running sums of endpoint weights; None when all weights are equal (plain rotation).
    cumulative_weights: Option<Vec<u64>>,
}

impl EndpointSet {
    pub fn new(endpoints: Vec<Arc<Endpoint>>) -> Self {
        let uniform = endpoints.windows(2).all(|w| w[0].weight == w[1].weight);
        let cumulative_weights = (!uniform)
            .then(|| crate::model::route::cumulative_weights(endpoints.iter().map(|e| e.weight as u64)));
        EndpointSet { endpoints, cumulative_weights }
    }

    pub fn pick(&self, policy: LbPolicy, rotation: &AtomicUsize) -> Option<&Arc<Endpoint>> {
        let n = self.endpoints.len();
        if n <= 1 {
            return self.endpoints.first();
        }
        let index = match policy {
            LbPolicy::RoundRobin => match &self.cumulative_weights {
                None => rotation.fetch_add(1, Relaxed) % n,
                Some(sums) => {
                    let total = *sums.last().unwrap();
                    pick_index(sums, rotation.fetch_add(1, Relaxed) as u64 % total)
                }
            },
            LbPolicy::Random => self.weighted_random(),
            LbPolicy::LeastRequest => {
                let a = self.weighted_random();
                let b = self.weighted_random();
                if self.endpoints[b].active_requests() < self.endpoints[a].active_requests() {
                    b
                } else {
                    a
                }
            }
        };
        self.endpoints.get(index)
    }

    fn weighted_random(&self) -> usize {
        match &self.cumulative_weights {
            None => fastrand::usize(..self.endpoints.len()),
            Some(sums) => pick_index(sums, fastrand::u64(..*sums.last().unwrap())),
        }
    }
}
