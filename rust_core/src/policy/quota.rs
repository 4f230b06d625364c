//! Requests a global rate limit service granted in advance (meshctl's quota extension to
//! ShouldRateLimit), per descriptor: a bounded cache the filter takes from before calling, and
//! which asks for more before it runs out, so that a steady caller never waits for the service.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::local_ratelimit::Descriptor;

/// Envoy's filter never reads quota; meshctl's cache holds at most this many descriptors per
/// filter config, so a service granting for unbounded descriptor values cannot grow memory.
pub const MAX_QUOTA_DESCRIPTORS: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Grant {
    remaining: u32,
    valid_until: Instant,
}

/// One descriptor's quota.
#[derive(Debug)]
struct Quota {
    /// Live grants, soonest deadline first; a request takes from the first. Two, so that a refill
    /// that arrives before the current grant is spent keeps its own later deadline (merged, the
    /// sooner one would hold for both and expire requests the service counted).
    grants: [Option<Grant>; 2],
    /// The service said OVER_LIMIT until then: once the grants are spent, requests are refused
    /// without a call (the service counted the grants, so they are still admitted).
    refused_until: Option<Instant>,
    /// The latest grant is due a refill when at most this many requests are left...
    refill_below: u32,
    /// ...or from this moment (three quarters of its life: a grant left unused that long was too
    /// large, and the refill the service sizes on it is smaller).
    refill_from: Instant,
    /// A refill is under way (or failed) until then: one at a time per descriptor.
    refill_blocked_until: Option<Instant>,
    /// The last refill got no grant: none is asked until a request's own call brings one.
    refill_declined: bool,
}

impl Quota {
    fn new(now: Instant) -> Quota {
        Quota { grants: [None, None], refused_until: None, refill_below: 0, refill_from: now, refill_blocked_until: None, refill_declined: false }
    }

    fn drop_expired(&mut self, now: Instant) {
        for slot in &mut self.grants {
            if slot.is_some_and(|g| g.valid_until <= now || g.remaining == 0) {
                *slot = None;
            }
        }
        if self.grants[0].is_none() {
            self.grants.swap(0, 1);
        }
    }

    fn remaining(&self) -> u32 {
        self.grants.iter().flatten().map(|g| g.remaining).sum()
    }

    fn refused(&self, now: Instant) -> bool {
        self.refused_until.is_some_and(|until| until > now)
    }

    /// Nothing left to know: no live grant, refusal or refill under way.
    fn is_spent(&self, now: Instant) -> bool {
        self.grants[0].is_none() && !self.refused(now) && !self.refill_blocked_until.is_some_and(|until| until > now)
    }

    /// The latest moment this entry still says something (for eviction when the cache is full).
    fn expires(&self) -> Instant {
        let grants = self.grants.iter().flatten().map(|g| g.valid_until);
        grants.chain(self.refused_until).chain(self.refill_blocked_until).max().unwrap_or(self.refill_from)
    }

    fn add(&mut self, grant: Grant, now: Instant) {
        self.drop_expired(now);
        self.grants = match self.grants {
            [None, _] => [Some(grant), None],
            [Some(first), None] if grant.valid_until >= first.valid_until => [Some(first), Some(grant)],
            [Some(first), None] => [Some(grant), Some(first)],
            // Two held already (concurrent asks): added to the later, keeping the sooner of the two
            // deadlines, so that nothing passes after a deadline the service set.
            [Some(first), Some(later)] => {
                let merged = Grant {
                    remaining: later.remaining.saturating_add(grant.remaining),
                    valid_until: later.valid_until.min(grant.valid_until),
                };
                if merged.valid_until < first.valid_until { [Some(merged), Some(first)] } else { [Some(first), Some(merged)] }
            }
        };
        self.refill_below = grant.remaining / 2;
        self.refill_declined = false;
        self.refill_from = now + grant.valid_until.saturating_duration_since(now) * 3 / 4;
    }
}

/// What the cache says of a request, before any call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Local {
    /// Every descriptor had quota: one taken from each. `refill`: ask the service for more now,
    /// in the background (one of the descriptors runs low); the request does not wait for it.
    Admit { refill: bool },
    /// A descriptor is refused until its refusal expires (the service said OVER_LIMIT for it).
    Refuse,
    /// Neither: the service decides.
    Ask,
}

/// One filter config's quotas. Locked only for requests that have descriptors.
#[derive(Debug)]
pub struct QuotaCache {
    quotas: Mutex<HashMap<Descriptor, Quota>>,
    capacity: usize,
}

impl Default for QuotaCache {
    fn default() -> Self {
        QuotaCache::with_capacity(MAX_QUOTA_DESCRIPTORS)
    }
}

impl QuotaCache {
    pub fn with_capacity(capacity: usize) -> QuotaCache {
        QuotaCache { quotas: Mutex::new(HashMap::new()), capacity }
    }

    /// Admits the request when every descriptor has live quota (taking one from each), refuses it
    /// when one has none and is refused; otherwise takes nothing and the service decides. An
    /// admission that leaves a descriptor low asks for a refill, unless one is under way: the
    /// refill blocks another for `refill_timeout` (the call's own bound) or until `refill_over`.
    pub fn decide(&self, descriptors: &[Descriptor], now: Instant, refill_timeout: Duration) -> Local {
        if descriptors.is_empty() {
            return Local::Ask;
        }
        let mut quotas = self.quotas.lock().unwrap();
        let mut covered = true;
        for d in descriptors {
            let Some(quota) = quotas.get_mut(d) else {
                covered = false;
                continue;
            };
            quota.drop_expired(now);
            if quota.grants[0].is_none() {
                if quota.refused(now) {
                    return Local::Refuse;
                }
                covered = false;
            }
        }
        if !covered {
            return Local::Ask;
        }
        let mut refill = false;
        for d in descriptors {
            let Some(quota) = quotas.get_mut(d) else { continue };
            if let Some(first) = &mut quota.grants[0] {
                first.remaining -= 1;
            }
            quota.drop_expired(now);
            let low = quota.remaining() <= quota.refill_below || now >= quota.refill_from;
            let asking = quota.refill_declined || quota.refill_blocked_until.is_some_and(|until| until > now);
            if low && !asking && !quota.refused(now) {
                quota.refill_blocked_until = Some(now + refill_timeout);
                refill = true;
            }
            if quota.is_spent(now) {
                quotas.remove(d);
            }
        }
        Local::Admit { refill }
    }

    /// The refill asked for `descriptor` is over, its grant (if any) already recorded. Granted:
    /// another may be asked when this one runs low. Not (the service was over the limit, or
    /// grants no quota): none is asked again, as it would be declined too, until a request's own
    /// call (once the grants held are spent) brings a grant. A failed refill does not call this:
    /// the next waits for its timeout.
    pub fn refill_over(&self, descriptor: &Descriptor, granted: bool, now: Instant) {
        let mut quotas = self.quotas.lock().unwrap();
        if let Some(quota) = quotas.get_mut(descriptor) {
            quota.refill_blocked_until = None;
            quota.refill_declined = !granted;
            if quota.is_spent(now) {
                quotas.remove(descriptor);
            }
        }
    }

    /// Records that requests with `descriptor` are refused until `valid_until` (the service's
    /// OVER_LIMIT with an empty grant) once the quota already granted for it is spent.
    pub fn refuse(&self, descriptor: &Descriptor, valid_until: Instant, now: Instant) {
        if valid_until <= now || self.capacity == 0 {
            return;
        }
        let mut quotas = self.quotas.lock().unwrap();
        self.make_room(&mut quotas, descriptor, now);
        quotas.entry(descriptor.clone()).or_insert_with(|| Quota::new(now)).refused_until = Some(valid_until);
    }

    fn make_room(&self, quotas: &mut HashMap<Descriptor, Quota>, descriptor: &Descriptor, now: Instant) {
        if !quotas.contains_key(descriptor) && quotas.len() >= self.capacity {
            quotas.retain(|_, q| q.expires() > now);
            if quotas.len() >= self.capacity {
                let soonest = quotas.iter().min_by_key(|(_, q)| q.expires()).map(|(d, _)| d.clone());
                if let Some(d) = soonest {
                    quotas.remove(&d);
                }
            }
        }
    }

    /// Records that `requests` more requests with exactly `descriptor` may pass until
    /// `valid_until`, besides what it holds already: the service counted both (concurrent calls
    /// each get one). A grant lifts a refusal: the service had room again. When the cache is
    /// full, expired entries go first, then the one that expires soonest.
    pub fn grant(&self, descriptor: &Descriptor, requests: u32, valid_until: Instant, now: Instant) {
        if requests == 0 || valid_until <= now || self.capacity == 0 {
            return;
        }
        let mut quotas = self.quotas.lock().unwrap();
        self.make_room(&mut quotas, descriptor, now);
        let quota = quotas.entry(descriptor.clone()).or_insert_with(|| Quota::new(now));
        quota.refused_until = None;
        quota.add(Grant { remaining: requests, valid_until }, now);
    }

    /// Descriptors held (for tests).
    pub fn len(&self) -> usize {
        self.quotas.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REFILL_TIMEOUT: Duration = Duration::from_millis(20);

    fn d(key: &str, value: &str) -> Descriptor {
        vec![(key.to_string(), value.to_string())]
    }

    fn admits(cache: &QuotaCache, descriptors: &[Descriptor], now: Instant) -> bool {
        matches!(cache.decide(descriptors, now, REFILL_TIMEOUT), Local::Admit { .. })
    }

    fn admitted(cache: &QuotaCache, descriptor: &Descriptor, tries: usize, now: Instant) -> usize {
        (0..tries).filter(|_| admits(cache, std::slice::from_ref(descriptor), now)).count()
    }

    #[test]
    fn admits_exactly_the_granted_requests() {
        let cache = QuotaCache::default();
        let now = Instant::now();
        let a = d("k", "a");
        assert_eq!(cache.decide(std::slice::from_ref(&a), now, REFILL_TIMEOUT), Local::Ask);
        cache.grant(&a, 3, now + Duration::from_secs(1), now);
        assert_eq!(admitted(&cache, &a, 10, now), 3);
        assert_eq!(cache.decide(std::slice::from_ref(&a), now, REFILL_TIMEOUT), Local::Ask);
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
    fn a_refused_descriptor_is_refused_once_its_grants_are_spent_and_until_then() {
        let cache = QuotaCache::default();
        let now = Instant::now();
        let (a, b) = (d("k", "a"), d("k", "b"));
        cache.grant(&a, 5, now + Duration::from_secs(1), now);
        cache.refuse(&b, now + Duration::from_millis(100), now);
        assert_eq!(cache.decide(&[a.clone(), b.clone()], now, REFILL_TIMEOUT), Local::Refuse);
        assert_eq!(cache.decide(std::slice::from_ref(&b), now + Duration::from_millis(100), REFILL_TIMEOUT), Local::Ask);
        // The refused request took none of a's quota; a refusal does not take back what the
        // service granted and counted: a's 5 pass, then a is refused.
        cache.refuse(&a, now + Duration::from_millis(50), now);
        assert_eq!(admitted(&cache, &a, 10, now), 5);
        assert_eq!(cache.decide(std::slice::from_ref(&a), now, REFILL_TIMEOUT), Local::Refuse);
        // A grant lifts the refusal: the service had room again.
        cache.grant(&a, 2, now + Duration::from_secs(1), now);
        assert_eq!(admitted(&cache, &a, 10, now), 2);
    }

    #[test]
    fn grants_keep_their_own_deadlines_and_the_sooner_is_spent_first() {
        let cache = QuotaCache::default();
        let now = Instant::now();
        let at = |millis| now + Duration::from_millis(millis);
        let a = d("k", "a");
        cache.grant(&a, 3, at(1000), now);
        cache.grant(&a, 2, at(500), now);
        // The two from the one ending at 500 ms go first; the later grant's 3 outlive it.
        assert_eq!(admitted(&cache, &a, 2, at(100)), 2);
        assert_eq!(admitted(&cache, &a, 10, at(600)), 3);
        // A third grant while two are held joins the later one, under the sooner deadline of the two.
        cache.grant(&a, 1, at(2000), now);
        cache.grant(&a, 1, at(3000), now);
        cache.grant(&a, 5, at(2500), now);
        assert_eq!(admitted(&cache, &a, 1, at(1900)), 1);
        assert_eq!(admitted(&cache, &a, 10, at(2600)), 0);
    }

    #[test]
    fn a_refill_is_asked_once_when_half_is_spent_until_it_is_over() {
        let cache = QuotaCache::default();
        let now = Instant::now();
        let a = d("k", "a");
        let one = std::slice::from_ref(&a);
        cache.grant(&a, 10, now + Duration::from_secs(1), now);
        let decisions: Vec<Local> = (0..8).map(|_| cache.decide(one, now, REFILL_TIMEOUT)).collect();
        // 10 granted: the 5th request leaves 5, the half: it alone asks.
        let refills: Vec<usize> = (0..8).filter(|&i| decisions[i] == Local::Admit { refill: true }).collect();
        assert_eq!(refills, vec![4]);
        // The refill fails (never `refilled`): the next may ask once its timeout has passed.
        assert_eq!(cache.decide(one, now + REFILL_TIMEOUT, REFILL_TIMEOUT), Local::Admit { refill: true });
        cache.grant(&a, 20, now + Duration::from_secs(1), now);
        cache.refill_over(&a, true, now);
        // 1 + 20 left; the next refill at 10.
        assert_eq!(admitted(&cache, &a, 10, now), 10);
        assert_eq!(cache.decide(one, now, REFILL_TIMEOUT), Local::Admit { refill: true });
        // Declined (no grant): none is asked again while these grants last...
        cache.refill_over(&a, false, now);
        assert_eq!(admitted(&cache, &a, 10, now + REFILL_TIMEOUT * 2), 10);
        assert_eq!(cache.decide(one, now, REFILL_TIMEOUT), Local::Ask);
        // ...and a grant to a request's own call starts a new round.
        cache.grant(&a, 4, now + Duration::from_secs(1), now);
        assert_eq!(cache.decide(one, now, REFILL_TIMEOUT), Local::Admit { refill: false });
        assert_eq!(cache.decide(one, now, REFILL_TIMEOUT), Local::Admit { refill: true });
    }

    #[test]
    fn a_grant_unused_for_three_quarters_of_its_life_is_refilled_but_a_refused_one_is_not() {
        let cache = QuotaCache::default();
        let now = Instant::now();
        let at = |millis| now + Duration::from_millis(millis);
        let a = d("k", "a");
        let one = std::slice::from_ref(&a);
        cache.grant(&a, 100, at(1000), now);
        assert_eq!(cache.decide(one, at(700), REFILL_TIMEOUT), Local::Admit { refill: false });
        assert_eq!(cache.decide(one, at(750), REFILL_TIMEOUT), Local::Admit { refill: true });
        cache.refill_over(&a, true, at(760));
        cache.refuse(&a, at(900), at(760));
        assert_eq!(cache.decide(one, at(770), REFILL_TIMEOUT), Local::Admit { refill: false });
    }

    #[test]
    fn bounded_evicting_expired_then_soonest() {
        let cache = QuotaCache::with_capacity(2);
        let now = Instant::now();
        cache.grant(&d("k", "old"), 1, now + Duration::from_millis(5), now);
        cache.grant(&d("k", "long"), 3, now + Duration::from_secs(60), now);
        let later = now + Duration::from_millis(10);
        cache.grant(&d("k", "new"), 1, later + Duration::from_secs(1), later);
        assert_eq!(cache.len(), 2);
        assert!(admits(&cache, &[d("k", "long")], later));
        // Full, nothing expired: the soonest to expire ("new") makes room.
        cache.grant(&d("k", "third"), 1, later + Duration::from_secs(30), later);
        assert_eq!(cache.len(), 2);
        assert!(!admits(&cache, &[d("k", "new")], later));
        assert!(admits(&cache, &[d("k", "third")], later));
    }
}
