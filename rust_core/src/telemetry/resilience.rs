//! Retry, circuit-breaker and response-flag counters of a cluster (Envoy's names), lock-free;
//! and the fallback counters of the hosts meshctl's Fallback resources guard.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use super::metrics::ClusterStats;
use crate::model::fallback::FallbackReason;

/// Envoy's response flags for a request the proxy failed or answered itself. A fixed set, so
/// the series they make stay bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFlag {
    /// UH: no endpoint could take the request.
    NoHealthyUpstream,
    /// UF: the connection to the endpoint failed.
    UpstreamConnectionFailure,
    /// UO: a circuit breaker was open (connections, pending requests, requests, retries).
    UpstreamOverflow,
    /// URX: the request failed again with no retry left (num_retries).
    UpstreamRetryLimitExceeded,
    /// UT: the route's timeout or the last try's per-try timeout fired.
    UpstreamRequestTimeout,
    /// UR: the endpoint reset or closed the exchange before a response head.
    UpstreamRemoteReset,
    /// NR: no route matched (counted per listener).
    NoRouteFound,
    /// NC: the route's cluster is not configured (counted per listener).
    NoClusterFound,
    /// DI: the fault filter delayed the request (counted per listener).
    DelayInjected,
    /// FI: the fault filter aborted the request (counted per listener).
    FaultInjected,
    /// RL: a rate limit filter (local, or global on the service's OVER_LIMIT) answered the
    /// request (counted per listener).
    RateLimited,
    /// RLSE: the global rate limit service failed and failure_mode_deny refused the request
    /// (counted per listener).
    RateLimitServiceError,
}

impl ResponseFlag {
    pub const ALL: [ResponseFlag; 12] = [
        ResponseFlag::NoHealthyUpstream,
        ResponseFlag::UpstreamConnectionFailure,
        ResponseFlag::UpstreamOverflow,
        ResponseFlag::UpstreamRetryLimitExceeded,
        ResponseFlag::UpstreamRequestTimeout,
        ResponseFlag::UpstreamRemoteReset,
        ResponseFlag::NoRouteFound,
        ResponseFlag::NoClusterFound,
        ResponseFlag::DelayInjected,
        ResponseFlag::FaultInjected,
        ResponseFlag::RateLimited,
        ResponseFlag::RateLimitServiceError,
    ];
    /// The flags a cluster can see; the others are counted per listener.
    pub const UPSTREAM: [ResponseFlag; 6] = [
        ResponseFlag::NoHealthyUpstream,
        ResponseFlag::UpstreamConnectionFailure,
        ResponseFlag::UpstreamOverflow,
        ResponseFlag::UpstreamRetryLimitExceeded,
        ResponseFlag::UpstreamRequestTimeout,
        ResponseFlag::UpstreamRemoteReset,
    ];
    pub const DOWNSTREAM: [ResponseFlag; 6] = [
        ResponseFlag::NoRouteFound,
        ResponseFlag::NoClusterFound,
        ResponseFlag::DelayInjected,
        ResponseFlag::FaultInjected,
        ResponseFlag::RateLimited,
        ResponseFlag::RateLimitServiceError,
    ];

    /// Envoy's short name, as its access logs print it.
    pub fn short_name(self) -> &'static str {
        match self {
            ResponseFlag::NoHealthyUpstream => "UH",
            ResponseFlag::UpstreamConnectionFailure => "UF",
            ResponseFlag::UpstreamOverflow => "UO",
            ResponseFlag::UpstreamRetryLimitExceeded => "URX",
            ResponseFlag::UpstreamRequestTimeout => "UT",
            ResponseFlag::UpstreamRemoteReset => "UR",
            ResponseFlag::NoRouteFound => "NR",
            ResponseFlag::NoClusterFound => "NC",
            ResponseFlag::DelayInjected => "DI",
            ResponseFlag::FaultInjected => "FI",
            ResponseFlag::RateLimited => "RL",
            ResponseFlag::RateLimitServiceError => "RLSE",
        }
    }
}

/// One counter per flag.
#[derive(Debug, Default)]
pub struct ResponseFlagCounts([AtomicU64; ResponseFlag::ALL.len()]);

impl ResponseFlagCounts {
    pub fn record(&self, flag: ResponseFlag) {
        self.0[flag as usize].fetch_add(1, Relaxed);
    }

    pub fn get(&self, flag: ResponseFlag) -> u64 {
        self.0[flag as usize].load(Relaxed)
    }

    /// `{metric}{{{labels},flag="UH"}} n` for each of `flags`.
    pub fn render(&self, out: &mut String, metric: &str, labels: &str, flags: &[ResponseFlag]) {
        for flag in flags {
            let _ = writeln!(out, "{metric}{{{labels},flag=\"{}\"}} {}", flag.short_name(), self.get(*flag));
        }
    }
}

/// A cluster's retries and circuit breakers. The gauges are the breakers' own counts: what
/// is open now, compared with the thresholds on every request.
#[derive(Debug, Default)]
pub struct ResilienceStats {
    /// upstream_rq_retry: retries made.
    pub retries: AtomicU64,
    /// upstream_rq_retry_success: retries whose outcome needed no further retry.
    pub retry_successes: AtomicU64,
    /// upstream_rq_retry_overflow: retries the max_retries breaker or the retry budget refused.
    pub retry_overflows: AtomicU64,
    /// upstream_rq_retry_limit_exceeded: retries wanted when num_retries were used up.
    pub retry_limit_exceeded: AtomicU64,
    /// meshctl's own: retries wanted for a request whose body was too long to keep for replay.
    pub retries_skipped_body_too_large: AtomicU64,
    /// retry_or_shadow_abandoned (Envoy's name): mirror copies not sent, because the request body
    /// outgrew the route's buffer limit or failed, or too many copies were in flight.
    pub shadows_abandoned: AtomicU64,
    /// upstream_rq_per_try_timeout.
    pub per_try_timeouts: AtomicU64,
    /// upstream_rq_pending_overflow: requests refused by max_pending_requests.
    pub pending_overflows: AtomicU64,
    /// upstream_rq_active_overflow: requests refused by max_requests.
    pub active_overflows: AtomicU64,
    /// upstream_cx_overflow: connections max_connections kept from being opened.
    pub connection_overflows: AtomicU64,
    /// meshctl's own: requests for this cluster that its Fallback answered (any reason).
    pub fallbacks: AtomicU64,
    pub response_flags: ResponseFlagCounts,
    /// upstream_cx_active (connections open or opening; max_connections).
    pub connections_active: AtomicU64,
    /// upstream_rq_active (requests on a connection; max_requests).
    pub requests_active: AtomicU64,
    /// upstream_rq_pending_active (requests waiting for a connection; max_pending_requests).
    pub requests_pending: AtomicU64,
    /// Retries in flight, backoff included (max_retries, retry_budget).
    pub retries_active: AtomicU64,
    /// The global rate limit filter's decisions for requests routed to this cluster (Envoy's
    /// cluster.<route target cluster>.ratelimit.{ok,over_limit,error,failure_mode_allowed}).
    pub ratelimit_ok: AtomicU64,
    pub ratelimit_over_limit: AtomicU64,
    pub ratelimit_error: AtomicU64,
    pub ratelimit_failure_mode_allowed: AtomicU64,
    /// meshctl's own: requests the filter admitted from a quota the service granted, with no call.
    pub ratelimit_quota_admitted: AtomicU64,
    /// Requests refused without a call: the service refused their descriptor until a moment
    /// still to come (meshctl's quota extension).
    pub ratelimit_quota_refused: AtomicU64,
    /// Calls made ahead of need for quota running low (meshctl's), and those that failed.
    pub ratelimit_quota_refills: AtomicU64,
    pub ratelimit_quota_refill_errors: AtomicU64,
}

impl ResilienceStats {
    pub(crate) fn render(clusters: &BTreeMap<String, Arc<ClusterStats>>, out: &mut String, escape: fn(&str) -> String) {
        type Get = fn(&ResilienceStats) -> u64;
        let series: [(&str, &str, Get); 23] = [
            ("meshctl_upstream_rq_retry_total", "counter", |s| s.retries.load(Relaxed)),
            ("meshctl_upstream_rq_retry_success_total", "counter", |s| s.retry_successes.load(Relaxed)),
            ("meshctl_upstream_rq_retry_overflow_total", "counter", |s| s.retry_overflows.load(Relaxed)),
            ("meshctl_upstream_rq_retry_limit_exceeded_total", "counter", |s| s.retry_limit_exceeded.load(Relaxed)),
            ("meshctl_upstream_rq_retry_skipped_body_too_large_total", "counter", |s| s.retries_skipped_body_too_large.load(Relaxed)),
            ("meshctl_upstream_rq_per_try_timeout_total", "counter", |s| s.per_try_timeouts.load(Relaxed)),
            ("meshctl_retry_or_shadow_abandoned_total", "counter", |s| s.shadows_abandoned.load(Relaxed)),
            ("meshctl_upstream_rq_pending_overflow_total", "counter", |s| s.pending_overflows.load(Relaxed)),
            ("meshctl_upstream_rq_active_overflow_total", "counter", |s| s.active_overflows.load(Relaxed)),
            ("meshctl_upstream_cx_overflow_total", "counter", |s| s.connection_overflows.load(Relaxed)),
            ("meshctl_upstream_rq_fallback_total", "counter", |s| s.fallbacks.load(Relaxed)),
            ("meshctl_upstream_cx_active", "gauge", |s| s.connections_active.load(Relaxed)),
            ("meshctl_upstream_rq_active", "gauge", |s| s.requests_active.load(Relaxed)),
            ("meshctl_upstream_rq_pending_active", "gauge", |s| s.requests_pending.load(Relaxed)),
            ("meshctl_upstream_rq_retry_active", "gauge", |s| s.retries_active.load(Relaxed)),
            ("meshctl_cluster_ratelimit_ok_total", "counter", |s| s.ratelimit_ok.load(Relaxed)),
            ("meshctl_cluster_ratelimit_over_limit_total", "counter", |s| s.ratelimit_over_limit.load(Relaxed)),
            ("meshctl_cluster_ratelimit_error_total", "counter", |s| s.ratelimit_error.load(Relaxed)),
            ("meshctl_cluster_ratelimit_failure_mode_allowed_total", "counter", |s| s.ratelimit_failure_mode_allowed.load(Relaxed)),
            ("meshctl_cluster_ratelimit_quota_admitted_total", "counter", |s| s.ratelimit_quota_admitted.load(Relaxed)),
            ("meshctl_cluster_ratelimit_quota_refused_total", "counter", |s| s.ratelimit_quota_refused.load(Relaxed)),
            ("meshctl_cluster_ratelimit_quota_refill_total", "counter", |s| s.ratelimit_quota_refills.load(Relaxed)),
            ("meshctl_cluster_ratelimit_quota_refill_error_total", "counter", |s| s.ratelimit_quota_refill_errors.load(Relaxed)),
        ];
        for (metric, kind, get) in series {
            let _ = writeln!(out, "# TYPE {metric} {kind}");
            for (name, s) in clusters {
                let _ = writeln!(out, "{metric}{{cluster=\"{}\"}} {}", escape(name), get(&s.resilience));
            }
        }
        out.push_str("# TYPE meshctl_upstream_rq_response_flags_total counter\n");
        for (name, s) in clusters {
            let labels = format!("cluster=\"{}\"", escape(name));
            s.resilience.response_flags.render(out, "meshctl_upstream_rq_response_flags_total", &labels, &ResponseFlag::UPSTREAM);
        }
    }
}

/// meshctl_fallback_total{host,reason}: answers a Fallback gave instead of its host, by why.
#[derive(Debug, Default)]
pub struct FallbackStats {
    by_reason: [AtomicU64; 5],
}

impl FallbackStats {
    pub fn count(&self, reason: FallbackReason) {
        self.by_reason[reason as usize].fetch_add(1, Relaxed);
    }

    pub(crate) fn render(
        hosts: &BTreeMap<String, Arc<FallbackStats>>,
        breakers: &BTreeMap<String, Arc<AtomicU64>>,
        out: &mut String,
        escape: fn(&str) -> String,
    ) {
        out.push_str("# TYPE meshctl_fallback_total counter\n");
        for (host, stats) in hosts {
            for reason in FallbackReason::ALL {
                let count = stats.by_reason[reason as usize].load(Relaxed);
                let _ = writeln!(out, "meshctl_fallback_total{{host=\"{}\",reason=\"{}\"}} {count}", escape(host), reason.as_str());
            }
        }
        out.push_str("# TYPE meshctl_fallback_breaker_open gauge\n");
        for (cluster, open) in breakers {
            let _ = writeln!(out, "meshctl_fallback_breaker_open{{cluster=\"{}\"}} {}", escape(cluster), open.load(Relaxed));
        }
    }
}
