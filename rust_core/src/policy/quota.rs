//! Requests a global rate limit service granted in advance (meshctl's quota extension to
//! ShouldRateLimit), per descriptor: a bounded cache the filter takes from before calling, and
//! which asks for more before it runs out, so that a steady caller never waits for the service.
//! When a request must call, the requests behind it wait for that one call (its grant admits
//! them) rather than each calling: a burst, or many sidecars starting at once, cannot flood the
//! service, which would answer late, grant nothing and be called ever more.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::local_ratelimit::Descriptor;

/// Envoy's filter never reads quota; meshctl's cache holds at most this many descriptors per
/// filter config, so a service granting for unbounded descriptor values cannot grow memory.
pub const MAX_QUOTA_DESCRIPTORS: usize = 10_000;
/// After a call that brought no grant (the service grants no quota, or has none left), requests
/// call on their own, all at once as Envoy's filter does, for this long: waiting for one another's
/// calls would only queue them.
const ALONE_AFTER_NO_GRANT: Duration = Duration::from_secs(1);

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
    /// A request's own call is under way until then: the requests behind it wait for its answer.
    asking_until: Option<Instant>,
    /// Until then requests call on their own (ALONE_AFTER_NO_GRANT).
    alone_until: Option<Instant>,
    /// The last call failed at this moment: requests that waited for it fail with it (as theirs).
    failed_at: Option<Instant>,
}

impl Quota {
    fn new(now: Instant) -> Quota {
        Quota {
            grants: [None, None],
            refused_until: None,
            refill_below: 0,
            refill_from: now,
            refill_blocked_until: None,
            refill_declined: false,
            asking_until: None,
            alone_until: None,
            failed_at: None,
        }
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

    /// A call for this descriptor (a request's own, or a refill) is under way, and the requests
    /// that find no quota wait for it.
    fn call_to_wait_for(&self, now: Instant) -> bool {
        let under_way = |until: Option<Instant>| until.is_some_and(|until| until > now);
        (under_way(self.asking_until) || under_way(self.refill_blocked_until)) && !under_way(self.alone_until)
    }

    /// Nothing left to know: no live grant, refusal, call under way or outcome to remember.
    fn is_spent(&self, now: Instant) -> bool {
        self.grants[0].is_none() && self.expires() <= now
    }

    /// The latest moment this entry still says something (for eviction when the cache is full).
    fn expires(&self) -> Instant {
        let grants = self.grants.iter().flatten().map(|g| g.valid_until);
        let failure_kept = self.failed_at.map(|at| at + ALONE_AFTER_NO_GRANT);
        let moments = [self.refused_until, self.refill_blocked_until, self.asking_until, self.alone_until, failure_kept];
        grants.chain(moments.into_iter().flatten()).max().unwrap_or(self.refill_from)
    }

    /// Takes one request from the live grant (there is one), and says whether to ask for a
    /// refill now: the grant runs low and no refill is under way or declined (the refill is then
    /// marked under way for `timeout`).
    fn take(&mut self, now: Instant, timeout: Duration) -> bool {
        if let Some(first) = &mut self.grants[0] {
            first.remaining -= 1;
        }
        self.drop_expired(now);
        let low = self.remaining() <= self.refill_below || now >= self.refill_from;
        let asking = self.refill_declined || self.refill_blocked_until.is_some_and(|until| until > now);
        if low && !asking && !self.refused(now) {
            self.refill_blocked_until = Some(now + timeout);
            return true;
        }
        false
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
        self.alone_until = None;
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
    /// Neither: the service decides; this request calls (the requests behind it wait for it).
    Ask,
    /// Another request's call for a descriptor without quota is under way: wait for it (until
    /// `QuotaCache::changed` or the call's timeout), then decide again.
    Wait,
    /// The call this request waited for failed: the filter's failure mode applies to it too.
    Failed,
}

/// How a request's own call ended, for the requests that waited for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AskOutcome {
    Granted,
    /// Answered without a grant (OVER_LIMIT, or a service that grants no quota).
    NoGrant,
    Failed,
}

/// One filter config's quotas. Locked only for requests that have descriptors.
#[derive(Debug)]
pub struct QuotaCache {
    quotas: Mutex<HashMap<Descriptor, Quota>>,
    capacity: usize,
    /// Notified when a call other requests may wait for ends.
    pub changed: tokio::sync::Notify,
}

impl Default for QuotaCache {
    fn default() -> Self {
        QuotaCache::with_capacity(MAX_QUOTA_DESCRIPTORS)
    }
}

impl QuotaCache {
    pub fn with_capacity(capacity: usize) -> QuotaCache {
        QuotaCache { quotas: Mutex::new(HashMap::new()), capacity, changed: tokio::sync::Notify::new() }
    }

    /// Admits the request when every descriptor has live quota (taking one from each), refuses it
    /// when one has none and is refused. Otherwise the service decides: the request waits for a
    /// call under way for a descriptor it lacks, or calls itself (Ask: the call is marked under
    /// way for `timeout`, its bound, or until `ask_over`). `waiting_since`: when the request began
    /// waiting, if it did; a call that failed since then fails it too. An admission that leaves a
    /// descriptor low asks for a refill, unless a call is under way for it.
    pub fn decide(&self, descriptors: &[Descriptor], now: Instant, timeout: Duration, waiting_since: Option<Instant>) -> Local {
        if descriptors.is_empty() {
            return Local::Ask;
        }
        let mut quotas = self.quotas.lock().unwrap();
        // The common case, one descriptor with quota: one lookup (hashing the descriptor is most
        // of the cost), not the general path's two.
        if let [only] = descriptors {
            if let Some(quota) = quotas.get_mut(only) {
                quota.drop_expired(now);
                if quota.grants[0].is_some() {
                    let refill = quota.take(now, timeout);
                    if quota.is_spent(now) {
                        quotas.remove(only);
                    }
                    return Local::Admit { refill };
                }
            }
        }
        let (mut covered, mut wait, mut failed) = (true, true, false);
        for d in descriptors {
            let Some(quota) = quotas.get_mut(d) else {
                (covered, wait) = (false, false);
                continue;
            };
            quota.drop_expired(now);
            if quota.grants[0].is_none() {
                if quota.refused(now) {
                    return Local::Refuse;
                }
                covered = false;
                failed |= waiting_since.is_some_and(|since| quota.failed_at.is_some_and(|at| at >= since));
                wait &= quota.call_to_wait_for(now);
            }
        }
        if !covered {
            if failed {
                return Local::Failed;
            }
            if wait {
                return Local::Wait;
            }
            for d in descriptors {
                // Marked only where there is room: a marker never evicts another descriptor's grant.
                let missing = quotas.get(d).is_none_or(|q| q.grants[0].is_none());
                if missing && (quotas.contains_key(d) || quotas.len() < self.capacity) {
                    quotas.entry(d.clone()).or_insert_with(|| Quota::new(now)).asking_until = Some(now + timeout);
                }
            }
            return Local::Ask;
        }
        let mut refill = false;
        for d in descriptors {
            let Some(quota) = quotas.get_mut(d) else { continue };
            refill |= quota.take(now, timeout);
            if quota.is_spent(now) {
                quotas.remove(d);
            }
        }
        Local::Admit { refill }
    }

    /// The refill asked for `descriptor` is over, its grant (if any) already recorded. Granted:
    /// another may be asked when this one runs low. Not (failed, over the limit, or a service that
    /// grants no quota): none is asked again, as it would be declined too, until a request's own
    /// call (once the grants held are spent) brings a grant. Requests waiting for it decide again.
    pub fn refill_over(&self, descriptor: &Descriptor, granted: bool, now: Instant) {
        {
            let mut quotas = self.quotas.lock().unwrap();
            if let Some(quota) = quotas.get_mut(descriptor) {
                quota.refill_blocked_until = None;
                quota.refill_declined = !granted;
                if quota.is_spent(now) {
                    quotas.remove(descriptor);
                }
            }
        }
        self.changed.notify_waiters();
    }

    /// A request's own call for `descriptor` is over, its grant or refusal already recorded;
    /// the requests that waited for it decide again (and fail with it if it failed).
    pub fn ask_over(&self, descriptor: &Descriptor, outcome: AskOutcome, now: Instant) {
        let mut quotas = self.quotas.lock().unwrap();
        if let Some(quota) = quotas.get_mut(descriptor) {
            quota.asking_until = None;
            match outcome {
                AskOutcome::Granted => {}
                AskOutcome::NoGrant => quota.alone_until = Some(now + ALONE_AFTER_NO_GRANT),
                AskOutcome::Failed => quota.failed_at = Some(now),
            }
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
        matches!(cache.decide(descriptors, now, REFILL_TIMEOUT, None), Local::Admit { .. })
    }

    fn admitted(cache: &QuotaCache, descriptor: &Descriptor, tries: usize, now: Instant) -> usize {
        (0..tries).filter(|_| admits(cache, std::slice::from_ref(descriptor), now)).count()
    }

    #[test]
    fn admits_exactly_the_granted_requests() {
        let cache = QuotaCache::default();
        let now = Instant::now();
        let a = d("k", "a");
        assert_eq!(cache.decide(std::slice::from_ref(&a), now, REFILL_TIMEOUT, None), Local::Ask);
        cache.grant(&a, 3, now + Duration::from_secs(1), now);
        cache.ask_over(&a, AskOutcome::Granted, now);
        assert_eq!(admitted(&cache, &a, 10, now), 3);
        // The 2nd left 1 of 3 and asked for a refill: the next request waits for it, no longer.
        assert_eq!(cache.decide(std::slice::from_ref(&a), now, REFILL_TIMEOUT, None), Local::Wait);
        assert_eq!(cache.decide(std::slice::from_ref(&a), now + REFILL_TIMEOUT, REFILL_TIMEOUT, None), Local::Ask);
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
        assert_eq!(cache.decide(&[a.clone(), b.clone()], now, REFILL_TIMEOUT, None), Local::Refuse);
        assert_eq!(cache.decide(std::slice::from_ref(&b), now + Duration::from_millis(100), REFILL_TIMEOUT, None), Local::Ask);
        // The refused request took none of a's quota; a refusal does not take back what the
        // service granted and counted: a's 5 pass, then a is refused.
        cache.refuse(&a, now + Duration::from_millis(50), now);
        assert_eq!(admitted(&cache, &a, 10, now), 5);
        assert_eq!(cache.decide(std::slice::from_ref(&a), now, REFILL_TIMEOUT, None), Local::Refuse);
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
        let decisions: Vec<Local> = (0..8).map(|_| cache.decide(one, now, REFILL_TIMEOUT, None)).collect();
        // 10 granted: the 5th request leaves 5, the half: it alone asks.
        let refills: Vec<usize> = (0..8).filter(|&i| decisions[i] == Local::Admit { refill: true }).collect();
        assert_eq!(refills, vec![4]);
        // The refill fails (never `refilled`): the next may ask once its timeout has passed.
        assert_eq!(cache.decide(one, now + REFILL_TIMEOUT, REFILL_TIMEOUT, None), Local::Admit { refill: true });
        cache.grant(&a, 20, now + Duration::from_secs(1), now);
        cache.refill_over(&a, true, now);
        // 1 + 20 left; the next refill at 10.
        assert_eq!(admitted(&cache, &a, 10, now), 10);
        assert_eq!(cache.decide(one, now, REFILL_TIMEOUT, None), Local::Admit { refill: true });
        // Declined (no grant): none is asked again while these grants last...
        cache.refill_over(&a, false, now);
        assert_eq!(admitted(&cache, &a, 10, now + REFILL_TIMEOUT * 2), 10);
        assert_eq!(cache.decide(one, now, REFILL_TIMEOUT, None), Local::Ask);
        // ...and a grant to a request's own call starts a new round.
        cache.grant(&a, 4, now + Duration::from_secs(1), now);
        assert_eq!(cache.decide(one, now, REFILL_TIMEOUT, None), Local::Admit { refill: false });
        assert_eq!(cache.decide(one, now, REFILL_TIMEOUT, None), Local::Admit { refill: true });
    }

    #[test]
    fn a_grant_unused_for_three_quarters_of_its_life_is_refilled_but_a_refused_one_is_not() {
        let cache = QuotaCache::default();
        let now = Instant::now();
        let at = |millis| now + Duration::from_millis(millis);
        let a = d("k", "a");
        let one = std::slice::from_ref(&a);
        cache.grant(&a, 100, at(1000), now);
        assert_eq!(cache.decide(one, at(700), REFILL_TIMEOUT, None), Local::Admit { refill: false });
        assert_eq!(cache.decide(one, at(750), REFILL_TIMEOUT, None), Local::Admit { refill: true });
        cache.refill_over(&a, true, at(760));
        cache.refuse(&a, at(900), at(760));
        assert_eq!(cache.decide(one, at(770), REFILL_TIMEOUT, None), Local::Admit { refill: false });
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

    #[test]
    fn the_requests_behind_a_call_wait_for_it_and_take_from_its_grant() {
        let cache = QuotaCache::default();
        let now = Instant::now();
        let a = d("k", "a");
        let one = std::slice::from_ref(&a);
        assert_eq!(cache.decide(one, now, REFILL_TIMEOUT, None), Local::Ask);
        assert_eq!(cache.decide(one, now, REFILL_TIMEOUT, None), Local::Wait);
        assert_eq!(cache.decide(one, now, REFILL_TIMEOUT, Some(now)), Local::Wait);
        cache.grant(&a, 5, now + Duration::from_secs(1), now);
        cache.ask_over(&a, AskOutcome::Granted, now);
        assert_eq!(cache.decide(one, now, REFILL_TIMEOUT, Some(now)), Local::Admit { refill: false });
        // A call that never ends (its task gone) is waited for only until its timeout.
        assert_eq!(admitted(&cache, &a, 10, now), 4);
        assert_eq!(cache.decide(one, now, REFILL_TIMEOUT, None), Local::Wait); // the refill asked at the 3rd
        let later = now + REFILL_TIMEOUT;
        assert_eq!(cache.decide(one, later, REFILL_TIMEOUT, None), Local::Ask);
    }

    #[test]
    fn a_failed_call_fails_the_requests_that_waited_for_it_not_later_ones() {
        let cache = QuotaCache::default();
        let now = Instant::now();
        let at = |millis| now + Duration::from_millis(millis);
        let a = d("k", "a");
        let one = std::slice::from_ref(&a);
        assert_eq!(cache.decide(one, now, REFILL_TIMEOUT, None), Local::Ask);
        assert_eq!(cache.decide(one, at(1), REFILL_TIMEOUT, Some(at(1))), Local::Wait);
        cache.ask_over(&a, AskOutcome::Failed, at(5));
        assert_eq!(cache.decide(one, at(5), REFILL_TIMEOUT, Some(at(1))), Local::Failed);
        assert_eq!(cache.decide(one, at(6), REFILL_TIMEOUT, None), Local::Ask);
    }

    #[test]
    fn after_a_call_without_a_grant_requests_call_on_their_own_for_a_while() {
        let cache = QuotaCache::default();
        let now = Instant::now();
        let a = d("k", "a");
        let one = std::slice::from_ref(&a);
        assert_eq!(cache.decide(one, now, REFILL_TIMEOUT, None), Local::Ask);
        cache.ask_over(&a, AskOutcome::NoGrant, now);
        assert_eq!(cache.decide(one, now, REFILL_TIMEOUT, None), Local::Ask);
        assert_eq!(cache.decide(one, now, REFILL_TIMEOUT, None), Local::Ask);
        let later = now + ALONE_AFTER_NO_GRANT;
        assert_eq!(cache.decide(one, later, REFILL_TIMEOUT, None), Local::Ask);
        assert_eq!(cache.decide(one, later, REFILL_TIMEOUT, None), Local::Wait);
    }

    #[test]
    fn requests_that_find_the_quota_spent_while_a_refill_is_under_way_wait_for_it() {
        let cache = QuotaCache::default();
        let now = Instant::now();
        let a = d("k", "a");
        let one = std::slice::from_ref(&a);
        cache.grant(&a, 2, now + Duration::from_secs(1), now);
        assert_eq!(cache.decide(one, now, REFILL_TIMEOUT, None), Local::Admit { refill: true });
        assert_eq!(cache.decide(one, now, REFILL_TIMEOUT, None), Local::Admit { refill: false });
        assert_eq!(cache.decide(one, now, REFILL_TIMEOUT, None), Local::Wait);
        cache.grant(&a, 3, now + Duration::from_secs(1), now);
        cache.refill_over(&a, true, now);
        assert_eq!(cache.decide(one, now, REFILL_TIMEOUT, Some(now)), Local::Admit { refill: false });
    }
}
