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
    /// Requests still to admit without a call; 0: a refusal (every request refused until then).
    remaining: u32,
    valid_until: Instant,
}

/// What the cache says of a request, before any call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Local {
    /// Every descriptor had quota: one taken from each.
    Admit,
    /// A descriptor is refused until its refusal expires (the service said OVER_LIMIT for it).
    Refuse,
    /// Neither: the service decides.
    Ask,
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

    /// Refuses the request when one of its descriptors is refused, admits it when every one has
    /// live quota (taking one from each); otherwise takes nothing and the service decides.
    pub fn decide(&self, descriptors: &[Descriptor], now: Instant) -> Local {
        if descriptors.is_empty() {
            return Local::Ask;
        }
        let mut grants = self.grants.lock().unwrap();
        if descriptors.iter().any(|d| grants.get(d).is_some_and(|g| g.remaining == 0 && g.valid_until > now)) {
            return Local::Refuse;
        }
        let covered = descriptors
            .iter()
            .all(|d| grants.get(d).is_some_and(|g| g.remaining > 0 && g.valid_until > now));
        if !covered {
            return Local::Ask;
        }
        for d in descriptors {
            if let Some(grant) = grants.get_mut(d) {
                grant.remaining -= 1;
                if grant.remaining == 0 {
                    grants.remove(d);
                }
            }
        }
        Local::Admit
    }

    /// Records that requests with `descriptor` are refused until `valid_until` (the service's
    /// OVER_LIMIT with an empty grant), replacing any quota it had: the service refuses it now.
    pub fn refuse(&self, descriptor: &Descriptor, valid_until: Instant, now: Instant) {
        if valid_until <= now || self.capacity == 0 {
            return;
        }
        let mut grants = self.grants.lock().unwrap();
        self.make_room(&mut grants, descriptor, now);
        grants.insert(descriptor.clone(), Grant { remaining: 0, valid_until });
    }

    fn make_room(&self, grants: &mut HashMap<Descriptor, Grant>, descriptor: &Descriptor, now: Instant) {
        if !grants.contains_key(descriptor) && grants.len() >= self.capacity {
            grants.retain(|_, g| g.valid_until > now);
            if grants.len() >= self.capacity {
                let soonest = grants.iter().min_by_key(|(_, g)| g.valid_until).map(|(d, _)| d.clone());
                if let Some(d) = soonest {
                    grants.remove(&d);
                }
            }
        }
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
        self.make_room(&mut grants, descriptor, now);
        match grants.get_mut(descriptor) {
            Some(earlier) if earlier.valid_until > now && earlier.remaining > 0 => {
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

    fn admits(cache: &QuotaCache, descriptors: &[Descriptor], now: Instant) -> bool {
        cache.decide(descriptors, now) == Local::Admit
    }

    #[test]
    fn a_refused_descriptor_is_refused_until_then_whatever_else_the_request_has() {
        let cache = QuotaCache::default();
        let now = Instant::now();
        let (a, b) = (d("k", "a"), d("k", "b"));
        cache.grant(&a, 5, now + Duration::from_secs(1), now);
        cache.refuse(&b, now + Duration::from_millis(100), now);
        assert_eq!(cache.decide(&[a.clone(), b.clone()], now), Local::Refuse);
        assert_eq!(cache.decide(std::slice::from_ref(&b), now + Duration::from_millis(100)), Local::Ask);
        // The refused request took no quota of `a`; a refusal replaces a grant.
        assert_eq!((0..10).filter(|_| admits(&cache, std::slice::from_ref(&a), now)).count(), 5);
        cache.grant(&a, 5, now + Duration::from_secs(1), now);
        cache.refuse(&a, now + Duration::from_millis(50), now);
        assert_eq!(cache.decide(std::slice::from_ref(&a), now), Local::Refuse);
        // A grant after a refusal that is still live does not lift it... until it ends.
        cache.grant(&a, 5, now + Duration::from_secs(1), now + Duration::from_millis(60));
        assert!(admits(&cache, std::slice::from_ref(&a), now + Duration::from_millis(60)));
    }

    fn d(key: &str, value: &str) -> Descriptor {
        vec![(key.to_string(), value.to_string())]
    }

    #[test]
    fn admits_exactly_the_granted_requests() {
        let cache = QuotaCache::default();
        let now = Instant::now();
        let a = d("k", "a");
        assert!(!admits(&cache, std::slice::from_ref(&a), now));
        cache.grant(&a, 3, now + Duration::from_secs(1), now);
        let admitted = (0..10).filter(|_| admits(&cache, std::slice::from_ref(&a), now)).count();
        assert_eq!(admitted, 3);
        assert!(cache.is_empty());
    }

    #[test]
    fn expired_quota_admits_nothing() {
        let cache = QuotaCache::default();
        let now = Instant::now();
        let a = d("k", "a");
        cache.grant(&a, 5, now + Duration::from_millis(10), now);
        assert!(!admits(&cache, std::slice::from_ref(&a), now + Duration::from_millis(10)));
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
        assert!(!admits(&cache, &[a.clone(), b.clone()], now));
        // a's one request is still there.
        assert!(admits(&cache, std::slice::from_ref(&a), now));
        cache.grant(&a, 2, now + Duration::from_secs(1), now);
        cache.grant(&b, 1, now + Duration::from_secs(1), now);
        assert!(admits(&cache, &[a.clone(), b.clone()], now));
        // b is used up: the pair needs a call; a keeps its last one.
        assert!(!admits(&cache, &[a.clone(), b], now));
        assert!(admits(&cache, &[a], now));
        assert!(!admits(&cache, &[], now));
    }

    #[test]
    fn grants_for_one_descriptor_add_up_and_keep_the_sooner_deadline() {
        let cache = QuotaCache::default();
        let now = Instant::now();
        let a = d("k", "a");
        cache.grant(&a, 3, now + Duration::from_secs(10), now);
        cache.grant(&a, 2, now + Duration::from_secs(5), now);
        let at = |secs| now + Duration::from_secs(secs);
        assert_eq!((0..10).filter(|_| admits(&cache, std::slice::from_ref(&a), at(4))).count(), 5);
        cache.grant(&a, 3, at(10), now);
        cache.grant(&a, 2, at(5), now);
        assert!(!admits(&cache, std::slice::from_ref(&a), at(5)));
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
        assert!(admits(&cache, &[d("k", "long")], later));
        cache.grant(&d("k", "long"), 1, later + Duration::from_secs(60), later);
        // Full, nothing expired: the soonest to expire ("new") makes room.
        cache.grant(&d("k", "third"), 1, later + Duration::from_secs(30), later);
        assert_eq!(cache.len(), 2);
        assert!(!admits(&cache, &[d("k", "new")], later));
        assert!(admits(&cache, &[d("k", "third")], later));
    }
}
