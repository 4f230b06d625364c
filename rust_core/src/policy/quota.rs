//! Requests a global rate limit service granted in advance (meshctl's quota extension to
//! ShouldRateLimit), per descriptor: a bounded cache the filter takes from before calling.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use super::local_ratelimit::Descriptor;

/// Envoy's filter never reads quota; meshctl's cache holds at most this many descriptors per
/// filter config, so a service granting for unbounded descriptor values cannot grow memory.
pub const MAX_QUOTA_DESCRIPTORS: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Grant {
    /// Requests still to admit without a call.
    remaining: u32,
    valid_until: Instant,
}

/// One filter config's quotas. Locked only for requests that have descriptors.
#[derive(Debug)]
pub struct QuotaCache {
    grants: Mutex<HashMap<Descriptor, Grant>>,
    capacity: usize,
}

impl Default for QuotaCache {
    fn default() -> Self {
        QuotaCache::with_capacity(MAX_QUOTA_DESCRIPTORS)
    }
}

impl QuotaCache {
    pub fn with_capacity(capacity: usize) -> QuotaCache {
        QuotaCache { grants: Mutex::new(HashMap::new()), capacity }
    }

    /// Admits the request locally when every one of its descriptors has live quota, taking one
    /// from each; otherwise takes nothing (the request needs a call).
    pub fn try_admit(&self, descriptors: &[Descriptor], now: Instant) -> bool {
        if descriptors.is_empty() {
            return false;
        }
        let mut grants = self.grants.lock().unwrap();
        let covered = descriptors
            .iter()
            .all(|d| grants.get(d).is_some_and(|g| g.remaining > 0 && g.valid_until > now));
        if !covered {
            return false;
        }
        for d in descriptors {
            if let Some(grant) = grants.get_mut(d) {
                grant.remaining -= 1;
                if grant.remaining == 0 {
                    grants.remove(d);
                }
            }
        }
        true
    }

    /// Records that `requests` more requests with exactly `descriptor` may pass until
    /// `valid_until`. A live earlier grant for it is added to, not replaced: the service counted
    /// both (concurrent calls each get one), and the sooner expiry of the two then holds for all,
    /// so nothing passes after a deadline the service set. When the cache is full, expired grants
    /// go first, then the one that expires soonest.
    pub fn grant(&self, descriptor: &Descriptor, requests: u32, valid_until: Instant, now: Instant) {
        if requests == 0 || valid_until <= now || self.capacity == 0 {
            return;
        }
        let mut grants = self.grants.lock().unwrap();
        if !grants.contains_key(descriptor) && grants.len() >= self.capacity {
            grants.retain(|_, g| g.valid_until > now && g.remaining > 0);
            if grants.len() >= self.capacity {
                let soonest = grants.iter().min_by_key(|(_, g)| g.valid_until).map(|(d, _)| d.clone());
                if let Some(d) = soonest {
                    grants.remove(&d);
                }
            }
        }
        match grants.get_mut(descriptor) {
            Some(earlier) if earlier.valid_until > now => {
                earlier.remaining = earlier.remaining.saturating_add(requests);
                earlier.valid_until = earlier.valid_until.min(valid_until);
            }
            _ => {
                grants.insert(descriptor.clone(), Grant { remaining: requests, valid_until });
            }
        }
    }

    /// Descriptors held (for tests).
    pub fn len(&self) -> usize {
        self.grants.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn d(key: &str, value: &str) -> Descriptor {
        vec![(key.to_string(), value.to_string())]
    }

    #[test]
    fn admits_exactly_the_granted_requests() {
        let cache = QuotaCache::default();
        let now = Instant::now();
        let a = d("k", "a");
        assert!(!cache.try_admit(std::slice::from_ref(&a), now));
        cache.grant(&a, 3, now + Duration::from_secs(1), now);
        let admitted = (0..10).filter(|_| cache.try_admit(std::slice::from_ref(&a), now)).count();
        assert_eq!(admitted, 3);
        assert!(cache.is_empty());
    }

    #[test]
    fn expired_quota_admits_nothing() {
        let cache = QuotaCache::default();
        let now = Instant::now();
        let a = d("k", "a");
        cache.grant(&a, 5, now + Duration::from_millis(10), now);
        assert!(!cache.try_admit(std::slice::from_ref(&a), now + Duration::from_millis(10)));
        // Granted already expired: not kept.
        cache.grant(&d("k", "b"), 5, now, now);
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn every_descriptor_must_be_covered_and_a_miss_takes_nothing() {
        let cache = QuotaCache::default();
        let now = Instant::now();
        let (a, b) = (d("k", "a"), d("k", "b"));
        cache.grant(&a, 1, now + Duration::from_secs(1), now);
        assert!(!cache.try_admit(&[a.clone(), b.clone()], now));
        // a's one request is still there.
        assert!(cache.try_admit(std::slice::from_ref(&a), now));
        cache.grant(&a, 2, now + Duration::from_secs(1), now);
        cache.grant(&b, 1, now + Duration::from_secs(1), now);
        assert!(cache.try_admit(&[a.clone(), b.clone()], now));
        // b is used up: the pair needs a call; a keeps its last one.
        assert!(!cache.try_admit(&[a.clone(), b], now));
        assert!(cache.try_admit(&[a], now));
        assert!(!cache.try_admit(&[], now));
    }

    #[test]
    fn grants_for_one_descriptor_add_up_and_keep_the_sooner_deadline() {
        let cache = QuotaCache::default();
        let now = Instant::now();
        let a = d("k", "a");
        cache.grant(&a, 3, now + Duration::from_secs(10), now);
        cache.grant(&a, 2, now + Duration::from_secs(5), now);
        let at = |secs| now + Duration::from_secs(secs);
        assert_eq!((0..10).filter(|_| cache.try_admit(std::slice::from_ref(&a), at(4))).count(), 5);
        cache.grant(&a, 3, at(10), now);
        cache.grant(&a, 2, at(5), now);
        assert!(!cache.try_admit(std::slice::from_ref(&a), at(5)));
    }

    #[test]
    fn bounded_evicting_expired_then_soonest() {
        let cache = QuotaCache::with_capacity(2);
        let now = Instant::now();
        cache.grant(&d("k", "old"), 1, now + Duration::from_millis(5), now);
        cache.grant(&d("k", "long"), 1, now + Duration::from_secs(60), now);
        let later = now + Duration::from_millis(10);
        cache.grant(&d("k", "new"), 1, later + Duration::from_secs(1), later);
        assert_eq!(cache.len(), 2);
        assert!(cache.try_admit(&[d("k", "long")], later));
        cache.grant(&d("k", "long"), 1, later + Duration::from_secs(60), later);
        // Full, nothing expired: the soonest to expire ("new") makes room.
        cache.grant(&d("k", "third"), 1, later + Duration::from_secs(30), later);
        assert_eq!(cache.len(), 2);
        assert!(!cache.try_admit(&[d("k", "new")], later));
        assert!(cache.try_admit(&[d("k", "third")], later));
    }
}
