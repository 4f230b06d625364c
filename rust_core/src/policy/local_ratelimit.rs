//! Envoy's HTTP local rate limit on the request path: lock-free token buckets refilled lazily from
//! a clock read, descriptor buckets chosen by a request's rate-limit descriptors, and the
//! synchronous allow / limit / shadow decision made before any await.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::http::routing::{header_matches, RequestView};
use crate::model::local_ratelimit::{LocalRateLimit, RateLimitAction, RateLimitPolicy, VhRateLimits};
use crate::model::route::{Action, ClusterChoice, ForwardAction, Route, VirtualHost};
use crate::telemetry::metrics::LocalRateLimitDescriptorStats;

/// A token bucket's shape: Envoy's TokenBucket (max_tokens, tokens_per_fill, fill_interval).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BucketSpec {
    pub max_tokens: u32,
    pub tokens_per_fill: u32,
    #[serde(with = "crate::model::millis")]
    pub fill_interval: Duration,
}

impl BucketSpec {
    /// Tokens per second, to order descriptor buckets strictest first as Envoy does.
    fn fill_rate(&self) -> f64 {
        self.tokens_per_fill as f64 / self.fill_interval.as_secs_f64()
    }
}

/// A token bucket that starts full and refills continuously at tokens_per_fill per fill_interval
/// (Envoy 1.40's atomic bucket: no timer, refilled when read), capped at max_tokens.
///
/// The whole state is one atomic: the instant (ns after `epoch`) at which the bucket was, or
/// would have been, empty. The tokens now are (now - empty_at) × rate, capped; taking one moves
/// empty_at forward by one token's worth of time. Arithmetic is in integer "token-nanoseconds"
/// (one token = fill_interval ns × 1 / tokens_per_fill), so no rounding loses a token.
#[derive(Debug)]
pub struct TokenBucket {
    spec: BucketSpec,
    epoch: Instant,
    empty_at: AtomicU64,
    /// The time a full bucket takes to refill from empty, in ns: `now` starts there so the
    /// bucket starts full.
    full_after: u64,
}

impl TokenBucket {
    pub fn new(spec: BucketSpec) -> TokenBucket {
        let interval = spec.fill_interval.as_nanos().max(1);
        let full = (spec.max_tokens as u128 * interval).div_ceil(spec.tokens_per_fill.max(1) as u128);
        TokenBucket { spec, epoch: Instant::now(), empty_at: AtomicU64::new(0), full_after: full.min(1 << 62) as u64 }
    }

    fn now(&self) -> u64 {
        self.full_after + self.epoch.elapsed().as_nanos().min(1 << 62) as u64
    }

    /// Takes one token if there is one.
    pub fn try_take(&self) -> bool {
        self.try_take_at(self.now())
    }

    fn try_take_at(&self, now: u64) -> bool {
        let interval = self.spec.fill_interval.as_nanos().max(1);
        let per_fill = self.spec.tokens_per_fill.max(1) as u128;
        let capacity = self.spec.max_tokens as u128 * interval;
        let mut empty_at = self.empty_at.load(Relaxed);
        loop {
            // In token-ns: tokens × fill_interval_ns.
            let available = ((now.saturating_sub(empty_at)) as u128 * per_fill).min(capacity);
            if available < interval {
                return false;
            }
            // Rounded up, so the tokens left are never fewer than exact.
            let left_ns = (available - interval).div_ceil(per_fill) as u64;
            match self.empty_at.compare_exchange_weak(empty_at, now - left_ns, Relaxed, Relaxed) {
                Ok(_) => return true,
                Err(current) => empty_at = current,
            }
        }
    }

    /// Whole tokens left now (for tests and x-ratelimit-remaining).
    pub fn tokens(&self) -> u32 {
        let now = self.now();
        let interval = self.spec.fill_interval.as_nanos().max(1);
        let available = ((now.saturating_sub(self.empty_at.load(Relaxed))) as u128
            * self.spec.tokens_per_fill.max(1) as u128)
            .min(self.spec.max_tokens as u128 * interval);
        (available / interval) as u32
    }
}

/// One request descriptor: the (key, value) entries a rate-limit policy's actions produced.
pub type Descriptor = Vec<(String, String)>;

/// The buckets of one local rate limit config (or of one connection, per connection): the
/// default bucket and one bucket per configured descriptor, strictest first, each with its index
/// in the config (where its counters are).
#[derive(Debug)]
pub struct Limiter {
    default: Option<TokenBucket>,
    descriptors: Vec<(Descriptor, TokenBucket, usize)>,
    always_consume_default: bool,
}

impl Limiter {
    pub fn new(default: Option<BucketSpec>, descriptors: &[(Descriptor, BucketSpec)], always_consume_default: bool) -> Limiter {
        let mut sorted: Vec<(usize, &(Descriptor, BucketSpec))> = descriptors.iter().enumerate().collect();
        // Strictest (fewest tokens per second) first: a request a strict bucket refuses then
        // takes nothing from the looser ones (Envoy's order).
        sorted.sort_by(|a, b| a.1 .1.fill_rate().total_cmp(&b.1 .1.fill_rate()));
        Limiter {
            default: default.map(TokenBucket::new),
            descriptors: sorted.into_iter().map(|(index, (d, spec))| (d.clone(), TokenBucket::new(*spec), index)).collect(),
            always_consume_default,
        }
    }

    /// Envoy's order: each configured descriptor that equals one of the request's takes a token
    /// (the first refusal limits the request); then the default bucket, when no descriptor
    /// matched or always_consume_default_token_bucket. No default bucket: nothing to refuse.
    ///
    /// `counts` (the config's, by descriptor index; may be empty): the refusing descriptor counts
    /// the request limited; when it passes, every matching descriptor counts it allowed. A
    /// request the default bucket refuses counts for no descriptor (none of theirs refused it).
    pub fn allows(&self, request: &[Descriptor], counts: &[Arc<LocalRateLimitDescriptorStats>]) -> bool {
        let mut matched = false;
        // The positions (in bucket order) of the first 64 that matched: counted allowed below
        // without comparing descriptors again, and without allocating.
        let mut matches: u64 = 0;
        if !request.is_empty() {
            for (position, (descriptor, bucket, index)) in self.descriptors.iter().enumerate() {
                if request.iter().any(|r| r == descriptor) {
                    matched = true;
                    if position < 64 {
                        matches |= 1 << position;
                    }
                    if !bucket.try_take() {
                        if let Some(count) = counts.get(*index) {
                            count.limited.fetch_add(1, Relaxed);
                        }
                        return false;
                    }
                }
            }
        }
        let allowed = (matched && !self.always_consume_default) || self.default.as_ref().is_none_or(TokenBucket::try_take);
        if allowed && matched && !counts.is_empty() {
            for (position, (descriptor, _, index)) in self.descriptors.iter().enumerate() {
                let this = if position < 64 { matches & (1 << position) != 0 } else { request.iter().any(|r| r == descriptor) };
                if this {
                    if let Some(count) = counts.get(*index) {
                        count.allowed.fetch_add(1, Relaxed);
                    }
                }
            }
        }
        allowed
    }
}

/// The per-connection limiters of one downstream connection, made on first use, one per config
/// (keyed by the config's address, which lives as long as the config the request holds).
#[derive(Debug, Default)]
pub struct ConnectionLimiters {
    made: Mutex<Vec<(usize, Arc<Limiter>)>>,
}

impl ConnectionLimiters {
    pub fn get_or_make(&self, key: usize, make: impl FnOnce() -> Limiter) -> Arc<Limiter> {
        let mut made = self.made.lock().unwrap();
        if let Some((_, limiter)) = made.iter().find(|(k, _)| *k == key) {
            return limiter.clone();
        }
        let limiter = Arc::new(make());
        made.push((key, limiter.clone()));
        limiter
    }
}

/// What the filter decided for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not enabled for it, or a token was there.
    Pass,
    /// Limited, but the config does not enforce: it goes on (with the not-enforced headers).
    Shadow,
    /// Limited and enforced: answered locally (status, "local_rate_limited", flag RL).
    Limit,
}

/// Where the request's descriptors come from: its route and virtual host, and the client.
pub struct RequestDescriptorSource<'a> {
    pub route: &'a Route,
    pub vhost: &'a VirtualHost,
    pub request: &'a RequestView<'a>,
    /// The client's address (remote_address): worked out only for a policy that asks for it,
    /// as reading x-forwarded-for costs every request that has none.
    pub client_ip: &'a dyn Fn() -> IpAddr,
}

/// Envoy's decodeHeaders of the local rate limit filter, synchronously: draws filter_enabled,
/// builds descriptors (only when the config has descriptor buckets), takes tokens, draws
/// filter_enforced, and counts each step under the config's stat_prefix.
pub fn decide(config: &LocalRateLimit, source: &RequestDescriptorSource<'_>, connection: &ConnectionLimiters) -> Verdict {
    if !config.enabled.sample() {
        return Verdict::Pass;
    }
    config.stats.enabled.fetch_add(1, Relaxed);
    let descriptors = if config.descriptors.is_empty() { Vec::new() } else { request_descriptors(config, source) };
    let allowed = if config.per_connection {
        connection
            .get_or_make(config as *const LocalRateLimit as usize, || config.make_limiter())
            .allows(&descriptors, &config.descriptor_stats)
    } else {
        config.limiter.allows(&descriptors, &config.descriptor_stats)
    };
    if allowed {
        config.stats.ok.fetch_add(1, Relaxed);
        return Verdict::Pass;
    }
    config.stats.rate_limited.fetch_add(1, Relaxed);
    if !config.enforced.sample() {
        return Verdict::Shadow;
    }
    config.stats.enforced.fetch_add(1, Relaxed);
    Verdict::Limit
}

/// The config's own rate_limits when it has them; else the route's policies of the config's
/// stage, and the virtual host's as vh_rate_limits (or the route's include_vh_rate_limits) says.
fn request_descriptors(config: &LocalRateLimit, source: &RequestDescriptorSource<'_>) -> Vec<Descriptor> {
    if !config.rate_limits.is_empty() {
        let mut out = Vec::new();
        for policy in &config.rate_limits {
            push_descriptor(policy, source, &mut out);
        }
        return out;
    }
    // A disable_key names a runtime key that turns the policy off; Envoy's local filter skips
    // such policies outright.
    route_descriptors(source, config.stage, config.vh_rate_limits, true)
}

/// The descriptors of the route's policies of `stage`, and of the virtual host's as `vh_rate_limits`
/// (or the route's include_vh_rate_limits) says; `skip_disabled`: leave out policies with a
/// disable_key.
pub fn route_descriptors(
    source: &RequestDescriptorSource<'_>,
    stage: u32,
    vh_rate_limits: VhRateLimits,
    skip_disabled: bool,
) -> Vec<Descriptor> {
    let mut out = Vec::new();
    let route_policies = &source.route.rate_limits;
    let include_vhost = if source.route.include_vh_rate_limits {
        true
    } else {
        match vh_rate_limits {
            VhRateLimits::Include => true,
            VhRateLimits::Ignore => false,
            VhRateLimits::Override => route_policies.is_empty(),
        }
    };
    let vhost_policies = if include_vhost { &source.vhost.rate_limits[..] } else { &[] };
    for policy in route_policies.iter().chain(vhost_policies) {
        if policy.stage == stage && !(skip_disabled && policy.disabled) {
            push_descriptor(policy, source, &mut out);
        }
    }
    out
}

/// One policy's descriptor: every action adds its entry, or the policy makes none.
fn push_descriptor(policy: &RateLimitPolicy, source: &RequestDescriptorSource<'_>, out: &mut Vec<Descriptor>) {
    // Allocated on the first entry only: a policy that makes nothing costs nothing.
    let mut entries = Vec::new();
    for action in &policy.actions {
        match action {
            RateLimitAction::RequestHeaders { header_name, descriptor_key, skip_if_absent } => {
                match source.request.headers.get(header_name.as_str()).map(|v| String::from_utf8_lossy(v.as_bytes())) {
                    Some(value) => entries.push((descriptor_key.clone(), value.into_owned())),
                    None if *skip_if_absent => {}
                    None => return,
                }
            }
            RateLimitAction::RemoteAddress => entries.push(("remote_address".to_string(), (source.client_ip)().to_string())),
            RateLimitAction::GenericKey { descriptor_key, descriptor_value } => {
                entries.push((descriptor_key.clone(), descriptor_value.clone()))
            }
            RateLimitAction::HeaderValueMatch { descriptor_key, descriptor_value, expect_match, headers } => {
                if headers.iter().all(|h| header_matches(h, source.request)) != *expect_match {
                    return;
                }
                entries.push((descriptor_key.clone(), descriptor_value.clone()));
            }
            RateLimitAction::DestinationCluster => match &source.route.action {
                Action::Forward(ForwardAction { clusters: ClusterChoice::Single { name }, .. }) => {
                    entries.push(("destination_cluster".to_string(), name.clone()))
                }
                // Weighted clusters are picked after this filter runs in meshctl; Envoy picks at
                // route resolution. Such a route makes no descriptor here.
                _ => return,
            },
        }
    }
    if !entries.is_empty() {
        out.push(entries);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(max: u32, per_fill: u32, ms: u64) -> BucketSpec {
        BucketSpec { max_tokens: max, tokens_per_fill: per_fill, fill_interval: Duration::from_millis(ms) }
    }

    #[test]
    fn starts_full_and_empties() {
        let bucket = TokenBucket::new(spec(5, 1, 1000));
        let start = bucket.now();
        let taken = (0..12).filter(|_| bucket.try_take_at(start)).count();
        assert_eq!(taken, 5);
    }

    #[test]
    fn refills_tokens_per_fill_each_interval_capped_at_max() {
        let bucket = TokenBucket::new(spec(5, 2, 1000));
        let start = bucket.now();
        assert_eq!((0..5).filter(|_| bucket.try_take_at(start)).count(), 5);
        let second = 1_000_000_000;
        // Half an interval: one token of the two.
        assert_eq!((0..5).filter(|_| bucket.try_take_at(start + second / 2)).count(), 1);
        // A full interval later: two more.
        assert_eq!((0..5).filter(|_| bucket.try_take_at(start + second * 3 / 2)).count(), 2);
        // A long idle time refills to max, not beyond.
        assert_eq!((0..20).filter(|_| bucket.try_take_at(start + 100 * second)).count(), 5);
    }

    #[test]
    fn no_token_lost_to_rounding() {
        // 3 tokens per 7 ms: ns per token is not whole.
        let bucket = TokenBucket::new(spec(1000, 3, 7));
        let start = bucket.now();
        assert_eq!((0..1000).filter(|_| bucket.try_take_at(start)).count(), 1000);
        assert!(!bucket.try_take_at(start));
        // 7 ms: exactly 3 tokens.
        assert_eq!((0..10).filter(|_| bucket.try_take_at(start + 7_000_000)).count(), 3);
    }

    #[test]
    fn zero_max_tokens_refuses_everything() {
        let bucket = TokenBucket::new(spec(0, 1, 1000));
        assert!(!bucket.try_take());
    }

    #[test]
    fn descriptors_take_before_the_default() {
        let key: Descriptor = vec![("tier".into(), "free".into())];
        let limiter = Limiter::new(Some(spec(10, 1, 1000)), &[(key.clone(), spec(2, 1, 1000))], true);
        let request = [key.clone()];
        assert_eq!((0..5).filter(|_| limiter.allows(&request, &[])).count(), 2);
        // The default bucket paid for the two that passed: 8 left for other requests.
        assert_eq!((0..20).filter(|_| limiter.allows(&[], &[])).count(), 8);

        let lenient = Limiter::new(Some(spec(1, 1, 1000)), &[(key.clone(), spec(3, 1, 1000))], false);
        assert_eq!((0..5).filter(|_| lenient.allows(&request, &[])).count(), 3);
        assert!(lenient.allows(&[], &[]));
    }

    #[test]
    fn no_default_bucket_limits_only_descriptors() {
        let key: Descriptor = vec![("k".into(), "v".into())];
        let limiter = Limiter::new(None, &[(key.clone(), spec(1, 1, 1000))], true);
        assert!((0..10).all(|_| limiter.allows(&[], &[])));
        assert!(limiter.allows(std::slice::from_ref(&key), &[]));
        assert!(!limiter.allows(&[key], &[]));
    }

    fn counts(n: usize) -> Vec<Arc<LocalRateLimitDescriptorStats>> {
        (0..n).map(|_| Arc::default()).collect()
    }

    fn read(counts: &[Arc<LocalRateLimitDescriptorStats>]) -> Vec<(u64, u64)> {
        counts.iter().map(|c| (c.allowed.load(Relaxed), c.limited.load(Relaxed))).collect()
    }

    #[test]
    fn counts_per_descriptor_allowed_and_limited() {
        let strict: Descriptor = vec![("rule".into(), "strict".into())];
        let loose: Descriptor = vec![("rule".into(), "loose".into())];
        let idle: Descriptor = vec![("rule".into(), "idle".into())];
        // Configured loose first: the counters follow the config's order, not the buckets'.
        let configured = [(loose.clone(), spec(5, 1, 1000)), (strict.clone(), spec(2, 1, 2000)), (idle.clone(), spec(1, 1, 1000))];
        let limiter = Limiter::new(Some(spec(100, 1, 1000)), &configured, true);
        let counted = counts(3);
        let both = [loose.clone(), strict.clone()];
        let passed = (0..4).filter(|_| limiter.allows(&both, &counted)).count();
        assert_eq!(passed, 2);
        // Two passed through both buckets; two the strict one refused (the loose one then gave
        // nothing: it counts neither).
        assert_eq!(read(&counted), vec![(2, 0), (2, 2), (0, 0)]);
        let only_loose = [loose.clone()];
        let passed = (0..5).filter(|_| limiter.allows(&only_loose, &counted)).count();
        assert_eq!(passed, 3); // 5 tokens, 2 spent above
        assert_eq!(read(&counted), vec![(5, 2), (2, 2), (0, 0)]);
        // No descriptor matched: nothing counted per descriptor.
        assert!(limiter.allows(&[], &counted));
        assert_eq!(read(&counted), vec![(5, 2), (2, 2), (0, 0)]);
    }

    #[test]
    fn per_connection_limiters_share_the_config_counters() {
        let key: Descriptor = vec![("k".into(), "v".into())];
        let configured = [(key.clone(), spec(1, 1, 1000))];
        let counted = counts(1);
        let first = Limiter::new(None, &configured, true);
        let second = Limiter::new(None, &configured, true);
        let request = [key];
        assert!(first.allows(&request, &counted));
        assert!(!first.allows(&request, &counted));
        assert!(second.allows(&request, &counted));
        assert!(!second.allows(&request, &counted));
        assert_eq!(read(&counted), vec![(2, 2)]);
    }

    #[test]
    fn counts_descriptors_past_the_sixty_fourth() {
        let configured: Vec<(Descriptor, BucketSpec)> =
            (0..70).map(|i| (vec![("rule".to_string(), i.to_string())], spec(1, 1, 1000))).collect();
        let limiter = Limiter::new(None, &configured, true);
        let counted = counts(70);
        let request = [configured[1].0.clone(), configured[66].0.clone()];
        assert!(limiter.allows(&request, &counted));
        assert!(!limiter.allows(&request, &counted));
        let read = read(&counted);
        assert_eq!((read[1], read[66]), ((1, 1), (1, 0)));
        assert_eq!(read.iter().map(|(a, l)| a + l).sum::<u64>(), 3);
    }
}
