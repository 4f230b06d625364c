//! Lock-free counters and histograms; the request path only touches atomics it already holds.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::resilience::{FallbackStats, ResilienceStats, ResponseFlag};

/// Upper bounds of the latency buckets in milliseconds (Envoy's default histogram buckets).
pub(crate) const BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0,
    300000.0, 600000.0, 1800000.0, 3600000.0,
];

#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS_MS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn record(&self, elapsed: Duration) {
        let ms = elapsed.as_secs_f64() * 1000.0;
        if let Some(i) = BUCKETS_MS.iter().position(|&bound| ms <= bound) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_micros.fetch_add(elapsed.as_micros() as u64, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (bound, bucket) in BUCKETS_MS.iter().zip(&self.buckets) {
            cumulative += bucket.load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum_micros.load(Relaxed) as f64 / 1000.0);
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

/// Responses counted by status class: 1xx .. 5xx.
#[derive(Debug, Default)]
pub struct CodeClasses([AtomicU64; 5]);

impl CodeClasses {
    pub fn record(&self, status: u16) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.0[class].fetch_add(1, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        for (i, counter) in self.0.iter().enumerate() {
            let _ = writeln!(out, "{name}{{{labels},code_class=\"{}xx\"}} {}", i + 1, counter.load(Relaxed));
        }
    }
}

#[derive(Debug, Default)]
pub struct ListenerStats {
    pub connections_total: AtomicU64,
    pub connections_active: AtomicU64,
    pub requests_total: AtomicU64,
    pub responses: CodeClasses,
    pub detection_fallbacks: AtomicU64,
    pub header_limit_rejections: AtomicU64,
    /// Downstream codec errors (malformed request heads or chunked bodies, HTTP/2 connection
    /// errors), as Envoy's downstream_cx_protocol_error.
    pub protocol_errors: AtomicU64,
    /// Requests that found no route (NR) or no cluster (NC).
    pub response_flags: super::resilience::ResponseFlagCounts,
}

#[derive(Debug, Default)]
pub struct ClusterStats {
    /// Retries, circuit breakers and response flags.
    pub resilience: super::resilience::ResilienceStats,
    pub connections_total: AtomicU64,
    pub connect_failures: AtomicU64,
    pub requests_total: AtomicU64,
    pub responses: CodeClasses,
    pub latency: Histogram,
}

/// Why outlier detection ejected (or would have ejected) an endpoint, in Envoy's stat names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EjectionType {
    Consecutive5xx,
    ConsecutiveGatewayFailure,
    ConsecutiveLocalOriginFailure,
    SuccessRate,
    LocalOriginSuccessRate,
    FailurePercentage,
    LocalOriginFailurePercentage,
}

impl EjectionType {
    pub const ALL: [EjectionType; 7] = [
        EjectionType::Consecutive5xx,
        EjectionType::ConsecutiveGatewayFailure,
        EjectionType::ConsecutiveLocalOriginFailure,
        EjectionType::SuccessRate,
        EjectionType::LocalOriginSuccessRate,
        EjectionType::FailurePercentage,
        EjectionType::LocalOriginFailurePercentage,
    ];

    pub fn stat_name(self) -> &'static str {
        match self {
            EjectionType::Consecutive5xx => "consecutive_5xx",
            EjectionType::ConsecutiveGatewayFailure => "consecutive_gateway_failure",
            EjectionType::ConsecutiveLocalOriginFailure => "consecutive_local_origin_failure",
            EjectionType::SuccessRate => "success_rate",
            EjectionType::LocalOriginSuccessRate => "local_origin_success_rate",
            EjectionType::FailurePercentage => "failure_percentage",
            EjectionType::LocalOriginFailurePercentage => "local_origin_failure_percentage",
        }
    }
}

/// A cluster's outlier detection (Envoy's `outlier_detection.*`) and what endpoint health did to
/// balancing (`lb_healthy_panic`, `upstream_cx_none_healthy`). Kept apart from ClusterStats.
#[derive(Debug, Default)]
pub struct OutlierStats {
    /// The cluster has outlier detection configured: its ejection series are shown.
    pub configured: std::sync::atomic::AtomicBool,
    pub ejections_active: AtomicU64,
    pub ejections_enforced_total: AtomicU64,
    pub ejections_enforced: [AtomicU64; EjectionType::ALL.len()],
    pub ejections_detected: [AtomicU64; EjectionType::ALL.len()],
    /// Ejections max_ejection_percent prevented.
    pub ejections_overflow: AtomicU64,
    /// Picks made over every endpoint because too few were healthy.
    pub lb_healthy_panic: AtomicU64,
    /// Requests or connections that found no endpoint to use (503, flag UH).
    pub none_healthy: AtomicU64,
}

impl OutlierStats {
    pub fn enforced(&self, kind: EjectionType) {
        self.ejections_enforced_total.fetch_add(1, Relaxed);
        self.ejections_enforced[kind as usize].fetch_add(1, Relaxed);
    }

    pub fn detected(&self, kind: EjectionType) {
        self.ejections_detected[kind as usize].fetch_add(1, Relaxed);
    }

    fn render(all: &BTreeMap<String, Arc<OutlierStats>>, out: &mut String) {
        let configured: Vec<_> = all.iter().filter(|(_, s)| s.configured.load(Relaxed)).collect();
        let mut series = |metric: &str, kind: &str, get: &dyn Fn(&OutlierStats) -> u64, only_configured: bool| {
            let _ = writeln!(out, "# TYPE {metric} {kind}");
            let clusters: Box<dyn Iterator<Item = (&String, &Arc<OutlierStats>)>> =
                if only_configured { Box::new(configured.iter().copied()) } else { Box::new(all.iter()) };
            for (name, s) in clusters {
                let _ = writeln!(out, "{metric}{{cluster=\"{}\"}} {}", escape(name), get(s));
            }
        };
        series("meshctl_outlier_detection_ejections_active", "gauge", &|s| s.ejections_active.load(Relaxed), true);
        series("meshctl_outlier_detection_ejections_enforced_total", "counter", &|s| s.ejections_enforced_total.load(Relaxed), true);
        for kind in EjectionType::ALL {
            let metric = format!("meshctl_outlier_detection_ejections_enforced_{}_total", kind.stat_name());
            series(&metric, "counter", &|s| s.ejections_enforced[kind as usize].load(Relaxed), true);
        }
        for kind in EjectionType::ALL {
            let metric = format!("meshctl_outlier_detection_ejections_detected_{}_total", kind.stat_name());
            series(&metric, "counter", &|s| s.ejections_detected[kind as usize].load(Relaxed), true);
        }
        series("meshctl_outlier_detection_ejections_overflow_total", "counter", &|s| s.ejections_overflow.load(Relaxed), true);
        series("meshctl_lb_healthy_panic_total", "counter", &|s| s.lb_healthy_panic.load(Relaxed), false);
        series("meshctl_upstream_cx_none_healthy_total", "counter", &|s| s.none_healthy.load(Relaxed), false);
    }
}

#[derive(Debug, Default)]
pub struct RouteStats {
    pub requests_total: AtomicU64,
    pub latency: Histogram,
}

#[derive(Debug, Clone, Copy)]
pub enum TlsDirection {
    Downstream,
    Upstream,
}

impl TlsDirection {
    fn label(self) -> &'static str {
        match self {
            TlsDirection::Downstream => "downstream",
            TlsDirection::Upstream => "upstream",
        }
    }
}

/// Distinct peer principals counted one by one; the rest share the label "other" (a bound on
/// the series a misbehaving CA could create).
const MAX_PEER_PRINCIPALS: usize = 1024;

/// TLS handshakes, their failures by short reason, and requests by verified peer identity.
#[derive(Debug, Default)]
pub struct TlsStats {
    handshakes: [AtomicU64; 2],
    errors: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    requests_by_peer: Mutex<BTreeMap<String, Arc<AtomicU64>>>,
}

impl TlsStats {
    pub fn handshake(&self, direction: TlsDirection) {
        self.handshakes[direction as usize].fetch_add(1, Relaxed);
    }

    /// Failures are rare next to requests: a mutex is fine here.
    pub fn handshake_error(&self, direction: TlsDirection, reason: &'static str) {
        *self.errors.lock().unwrap().entry((direction.label(), reason)).or_default() += 1;
    }

    /// The request counter of one peer principal, looked up once per connection.
    pub fn peer_requests(&self, principal: &str) -> Arc<AtomicU64> {
        let mut peers = self.requests_by_peer.lock().unwrap();
        if let Some(counter) = peers.get(principal) {
            return counter.clone();
        }
        let key = if peers.len() < MAX_PEER_PRINCIPALS { principal } else { "other" };
        peers.entry(key.to_string()).or_default().clone()
    }

    fn render(&self, out: &mut String) {
        out.push_str("# TYPE meshctl_tls_handshakes_total counter\n");
        for direction in [TlsDirection::Downstream, TlsDirection::Upstream] {
            let count = self.handshakes[direction as usize].load(Relaxed);
            let _ = writeln!(out, "meshctl_tls_handshakes_total{{direction=\"{}\"}} {count}", direction.label());
        }
        out.push_str("# TYPE meshctl_tls_handshake_errors_total counter\n");
        for ((direction, reason), count) in self.errors.lock().unwrap().iter() {
            let _ = writeln!(out, "meshctl_tls_handshake_errors_total{{direction=\"{direction}\",reason=\"{reason}\"}} {count}");
        }
        out.push_str("# TYPE meshctl_downstream_requests_by_peer_total counter\n");
        for (principal, count) in self.requests_by_peer.lock().unwrap().iter() {
            let _ = writeln!(out, "meshctl_downstream_requests_by_peer_total{{peer_principal=\"{}\"}} {}", escape(principal), count.load(Relaxed));
        }
    }
}

/// RBAC outcomes: denials by filter action and matching DENY policy ("" when an ALLOW filter
/// matched nothing), and requests every RBAC filter let through. Counters are made when config
/// is applied, so the request path only increments atomics it holds.
#[derive(Debug, Default)]
pub struct RbacStats {
    denied: Mutex<BTreeMap<(&'static str, String), Arc<AtomicU64>>>,
    allowed: Arc<AtomicU64>,
}

impl RbacStats {
    pub fn denied(&self, action: &'static str, policy: &str) -> Arc<AtomicU64> {
        self.denied.lock().unwrap().entry((action, policy.to_string())).or_default().clone()
    }

    pub fn allowed(&self) -> Arc<AtomicU64> {
        self.allowed.clone()
    }

    fn render(&self, out: &mut String) {
        out.push_str("# TYPE meshctl_rbac_denied_total counter\n");
        for ((action, policy), count) in self.denied.lock().unwrap().iter() {
            let _ = writeln!(out, "meshctl_rbac_denied_total{{action=\"{action}\",policy=\"{}\"}} {}", escape(policy), count.load(Relaxed));
        }
        out.push_str("# TYPE meshctl_rbac_allowed_total counter\n");
        let _ = writeln!(out, "meshctl_rbac_allowed_total {}", self.allowed.load(Relaxed));
    }
}

/// Envoy's <stat_prefix>.http_local_rate_limit.{enabled,enforced,rate_limited,ok}: the requests
/// the filter was enabled for, limited ones answered (enforced), limited ones (enforced or
/// shadow), and allowed ones. Configs with one stat_prefix share the counters, as in Envoy.
#[derive(Debug, Default)]
pub struct LocalRateLimitStats {
    pub enabled: AtomicU64,
    pub enforced: AtomicU64,
    pub rate_limited: AtomicU64,
    pub ok: AtomicU64,
}

/// meshctl's own (Envoy has none): per configured descriptor of a local rate limit config, the
/// requests its bucket gave a token to that then passed (`allowed`), and those its bucket refused
/// (`limited`; for a config that does not enforce, those it would have limited). Keyed by
/// (stat_prefix, descriptor), so every config naming that descriptor under that prefix (its
/// per-connection limiters, a reloaded config) adds to the same cumulative counters.
#[derive(Debug, Default)]
pub struct LocalRateLimitDescriptorStats {
    pub allowed: AtomicU64,
    pub limited: AtomicU64,
}

/// One descriptor's counts as read (for the agent's report and the admin endpoint).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DescriptorCount {
    pub stat_prefix: String,
    pub descriptor: Vec<(String, String)>,
    pub allowed: u64,
    pub limited: u64,
}

type DescriptorKey = (String, Vec<(String, String)>);

/// Envoy's adaptive concurrency gradient controller stats, per connection manager stat_prefix
/// (Envoy's http.<stat_prefix>.adaptive_concurrency.gradient_controller.*).
#[derive(Debug, Default)]
pub struct AdaptiveConcurrencyStats {
    /// Requests shed (answered concurrency_limit_exceeded_status) because the limit was reached.
    pub rq_blocked: AtomicU64,
    pub concurrency_limit: AtomicU64,
    pub min_rtt_msecs: AtomicU64,
    pub sample_rtt_msecs: AtomicU64,
    /// 1 while the minimum RTT is being measured (the limit is min_concurrency then).
    pub min_rtt_calculation_active: AtomicU64,
    pub burst_queue_size: AtomicU64,
}

#[derive(Debug, Default)]
struct ConfigCounters {
    applied: AtomicU64,
    rejected: AtomicU64,
}

/// The registry: stats objects are created on config apply and live on across config swaps.
#[derive(Debug, Default)]
pub struct Metrics {
    listeners: Mutex<BTreeMap<String, Arc<ListenerStats>>>,
    clusters: Mutex<BTreeMap<String, Arc<ClusterStats>>>,
    outliers: Mutex<BTreeMap<String, Arc<OutlierStats>>>,
    routes: Mutex<BTreeMap<String, Arc<RouteStats>>>,
    /// Fallback answers by guarded host, and each fallback breaker's open gauge by cluster.
    fallbacks: Mutex<BTreeMap<String, Arc<FallbackStats>>>,
    fallback_breakers: Mutex<BTreeMap<String, Arc<AtomicU64>>>,
    config: Mutex<BTreeMap<String, Arc<ConfigCounters>>>,
    local_rate_limits: Mutex<BTreeMap<String, Arc<LocalRateLimitStats>>>,
    local_rate_limit_descriptors: Mutex<BTreeMap<DescriptorKey, Arc<LocalRateLimitDescriptorStats>>>,
    adaptive_concurrency: Mutex<BTreeMap<String, Arc<AdaptiveConcurrencyStats>>>,
    pub rbac: RbacStats,
    pub tls: Arc<TlsStats>,
    /// Istio's standard metrics (istio_*), shared by every listener.
    pub istio: Arc<super::istio_metrics::IstioMetrics>,
}

fn get_or_create<T: Default>(map: &Mutex<BTreeMap<String, Arc<T>>>, name: &str) -> Arc<T> {
    let mut map = map.lock().unwrap();
    if let Some(existing) = map.get(name) {
        return existing.clone();
    }
    let created = Arc::new(T::default());
    map.insert(name.to_string(), created.clone());
    created
}

/// Label values are config names; escape what Prometheus' text format requires.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

impl Metrics {
    pub fn listener(&self, name: &str) -> Arc<ListenerStats> {
        get_or_create(&self.listeners, name)
    }

    pub fn cluster(&self, name: &str) -> Arc<ClusterStats> {
        get_or_create(&self.clusters, name)
    }

    pub fn outlier(&self, cluster: &str) -> Arc<OutlierStats> {
        get_or_create(&self.outliers, cluster)
    }

    pub fn fallback(&self, host: &str) -> Arc<FallbackStats> {
        get_or_create(&self.fallbacks, host)
    }

    pub fn fallback_breaker_gauge(&self, cluster: &str) -> Arc<AtomicU64> {
        get_or_create(&self.fallback_breakers, cluster)
    }

    pub fn route(&self, name: &str) -> Arc<RouteStats> {
        get_or_create(&self.routes, name)
    }

    pub fn local_rate_limit(&self, stat_prefix: &str) -> Arc<LocalRateLimitStats> {
        get_or_create(&self.local_rate_limits, stat_prefix)
    }

    /// The counters of one configured descriptor, made when a config naming it is decoded.
    pub fn local_rate_limit_descriptor(&self, stat_prefix: &str, descriptor: &[(String, String)]) -> Arc<LocalRateLimitDescriptorStats> {
        let mut map = self.local_rate_limit_descriptors.lock().unwrap();
        map.entry((stat_prefix.to_string(), descriptor.to_vec())).or_default().clone()
    }

    /// Every descriptor some live config still names, with its counts. Counters no config holds
    /// any more (the rule was removed) are dropped here, so their number stays that of the rules
    /// configured; a descriptor configured again later counts from zero.
    pub fn local_rate_limit_descriptor_counts(&self) -> Vec<DescriptorCount> {
        let mut map = self.local_rate_limit_descriptors.lock().unwrap();
        map.retain(|_, stats| Arc::strong_count(stats) > 1);
        map.iter()
            .map(|((stat_prefix, descriptor), s)| DescriptorCount {
                stat_prefix: stat_prefix.clone(),
                descriptor: descriptor.clone(),
                allowed: s.allowed.load(Relaxed),
                limited: s.limited.load(Relaxed),
            })
            .collect()
    }

    pub fn adaptive_concurrency(&self, stat_prefix: &str) -> Arc<AdaptiveConcurrencyStats> {
        get_or_create(&self.adaptive_concurrency, stat_prefix)
    }

    pub fn config_applied(&self, kind: &str) {
        get_or_create(&self.config, kind).applied.fetch_add(1, Relaxed);
    }

    pub fn config_rejected(&self, kind: &str) {
        get_or_create(&self.config, kind).rejected.fetch_add(1, Relaxed);
    }

    pub fn render_prometheus(&self) -> String {
        let mut out = String::with_capacity(8192);
        let listeners = self.listeners.lock().unwrap().clone();
        out.push_str("# TYPE meshctl_downstream_cx_total counter\n");
        for (name, s) in &listeners {
            let _ = writeln!(out, "meshctl_downstream_cx_total{{listener=\"{}\"}} {}", escape(name), s.connections_total.load(Relaxed));
        }
        out.push_str("# TYPE meshctl_downstream_cx_active gauge\n");
        for (name, s) in &listeners {
            let _ = writeln!(out, "meshctl_downstream_cx_active{{listener=\"{}\"}} {}", escape(name), s.connections_active.load(Relaxed));
        }
        out.push_str("# TYPE meshctl_downstream_rq_total counter\n");
        for (name, s) in &listeners {
            let _ = writeln!(out, "meshctl_downstream_rq_total{{listener=\"{}\"}} {}", escape(name), s.requests_total.load(Relaxed));
        }
        out.push_str("# TYPE meshctl_downstream_rs_total counter\n");
        for (name, s) in &listeners {
            s.responses.render(&mut out, "meshctl_downstream_rs_total", &format!("listener=\"{}\"", escape(name)));
        }
        out.push_str("# TYPE meshctl_protocol_detection_fallback_total counter\n");
        for (name, s) in &listeners {
            let _ = writeln!(out, "meshctl_protocol_detection_fallback_total{{listener=\"{}\"}} {}", escape(name), s.detection_fallbacks.load(Relaxed));
        }
        out.push_str("# TYPE meshctl_downstream_cx_protocol_error_total counter\n");
        for (name, s) in &listeners {
            let _ = writeln!(out, "meshctl_downstream_cx_protocol_error_total{{listener=\"{}\"}} {}", escape(name), s.protocol_errors.load(Relaxed));
        }
        out.push_str("# TYPE meshctl_downstream_rq_response_flags_total counter\n");
        for (name, s) in &listeners {
            let labels = format!("listener=\"{}\"", escape(name));
            s.response_flags.render(&mut out, "meshctl_downstream_rq_response_flags_total", &labels, &ResponseFlag::DOWNSTREAM);
        }
        let clusters = self.clusters.lock().unwrap().clone();
        for (metric, kind, get) in [
            ("meshctl_upstream_cx_total", "counter", (|s: &ClusterStats| s.connections_total.load(Relaxed)) as fn(&ClusterStats) -> u64),
            ("meshctl_upstream_cx_connect_fail_total", "counter", |s| s.connect_failures.load(Relaxed)),
            ("meshctl_upstream_rq_total", "counter", |s| s.requests_total.load(Relaxed)),
        ] {
            let _ = writeln!(out, "# TYPE {metric} {kind}");
            for (name, s) in &clusters {
                let _ = writeln!(out, "{metric}{{cluster=\"{}\"}} {}", escape(name), get(s));
            }
        }
        out.push_str("# TYPE meshctl_upstream_rs_total counter\n");
        for (name, s) in &clusters {
            s.responses.render(&mut out, "meshctl_upstream_rs_total", &format!("cluster=\"{}\"", escape(name)));
        }
        out.push_str("# TYPE meshctl_upstream_rq_time_ms histogram\n");
        for (name, s) in &clusters {
            s.latency.render(&mut out, "meshctl_upstream_rq_time_ms", &format!("cluster=\"{}\"", escape(name)));
        }
        ResilienceStats::render(&clusters, &mut out, escape);
        OutlierStats::render(&self.outliers.lock().unwrap().clone(), &mut out);
        let fallback_breakers = self.fallback_breakers.lock().unwrap().clone();
        FallbackStats::render(&self.fallbacks.lock().unwrap().clone(), &fallback_breakers, &mut out, escape);
        let routes = self.routes.lock().unwrap().clone();
        out.push_str("# TYPE meshctl_route_rq_total counter\n");
        for (name, s) in &routes {
            let _ = writeln!(out, "meshctl_route_rq_total{{route=\"{}\"}} {}", escape(name), s.requests_total.load(Relaxed));
        }
        out.push_str("# TYPE meshctl_route_rq_time_ms histogram\n");
        for (name, s) in &routes {
            s.latency.render(&mut out, "meshctl_route_rq_time_ms", &format!("route=\"{}\"", escape(name)));
        }
        let config = self.config.lock().unwrap().clone();
        out.push_str("# TYPE meshctl_config_apply_total counter\n");
        for (kind, c) in &config {
            let _ = writeln!(out, "meshctl_config_apply_total{{type=\"{}\"}} {}", escape(kind), c.applied.load(Relaxed));
        }
        out.push_str("# TYPE meshctl_config_reject_total counter\n");
        for (kind, c) in &config {
            let _ = writeln!(out, "meshctl_config_reject_total{{type=\"{}\"}} {}", escape(kind), c.rejected.load(Relaxed));
        }
        let local_rate_limits = self.local_rate_limits.lock().unwrap().clone();
        for (metric, get) in [
            ("meshctl_http_local_rate_limit_enabled_total", (|s: &LocalRateLimitStats| s.enabled.load(Relaxed)) as fn(&LocalRateLimitStats) -> u64),
            ("meshctl_http_local_rate_limit_enforced_total", |s| s.enforced.load(Relaxed)),
            ("meshctl_http_local_rate_limit_rate_limited_total", |s| s.rate_limited.load(Relaxed)),
            ("meshctl_http_local_rate_limit_ok_total", |s| s.ok.load(Relaxed)),
        ] {
            let _ = writeln!(out, "# TYPE {metric} counter");
            for (prefix, s) in &local_rate_limits {
                let _ = writeln!(out, "{metric}{{stat_prefix=\"{}\"}} {}", escape(prefix), get(s));
            }
        }
        let descriptors = self.local_rate_limit_descriptor_counts();
        out.push_str("# TYPE meshctl_http_local_rate_limit_descriptor_total counter\n");
        for count in &descriptors {
            let descriptor: Vec<String> = count.descriptor.iter().map(|(key, value)| format!("{key}={value}")).collect();
            for (outcome, value) in [("allowed", count.allowed), ("limited", count.limited)] {
                let _ = writeln!(
                    out,
                    "meshctl_http_local_rate_limit_descriptor_total{{stat_prefix=\"{}\",descriptor=\"{}\",outcome=\"{outcome}\"}} {value}",
                    escape(&count.stat_prefix),
                    escape(&descriptor.join(",")),
                );
            }
        }
        let adaptive = self.adaptive_concurrency.lock().unwrap().clone();
        for (metric, kind, get) in [
            ("meshctl_http_adaptive_concurrency_rq_blocked_total", "counter", (|s: &AdaptiveConcurrencyStats| s.rq_blocked.load(Relaxed)) as fn(&AdaptiveConcurrencyStats) -> u64),
            ("meshctl_http_adaptive_concurrency_limit", "gauge", |s| s.concurrency_limit.load(Relaxed)),
            ("meshctl_http_adaptive_concurrency_min_rtt_msecs", "gauge", |s| s.min_rtt_msecs.load(Relaxed)),
            ("meshctl_http_adaptive_concurrency_sample_rtt_msecs", "gauge", |s| s.sample_rtt_msecs.load(Relaxed)),
            ("meshctl_http_adaptive_concurrency_min_rtt_calculation_active", "gauge", |s| s.min_rtt_calculation_active.load(Relaxed)),
            ("meshctl_http_adaptive_concurrency_burst_queue_size", "gauge", |s| s.burst_queue_size.load(Relaxed)),
        ] {
            let _ = writeln!(out, "# TYPE {metric} {kind}");
            for (prefix, s) in &adaptive {
                let _ = writeln!(out, "{metric}{{stat_prefix=\"{}\"}} {}", escape(prefix), get(s));
            }
        }
        self.rbac.render(&mut out);
        self.tls.render(&mut out);
        super::access_log::render_prometheus(&mut out);
        super::span_export::render_prometheus(&mut out);
        self.istio.render(&mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_counters_outlive_a_reload_and_go_with_the_last_config() {
        let metrics = Metrics::default();
        let rule = vec![("meshctl_rate_limit".to_string(), "default/limits/0".to_string())];
        let old = metrics.local_rate_limit_descriptor("local_rate_limit", &rule);
        old.allowed.fetch_add(3, Relaxed);
        // A reload decodes the new config while the old one still runs: the same counters.
        let new = metrics.local_rate_limit_descriptor("local_rate_limit", &rule);
        drop(old);
        new.limited.fetch_add(2, Relaxed);
        let counts = metrics.local_rate_limit_descriptor_counts();
        assert_eq!(counts.len(), 1);
        assert_eq!((counts[0].allowed, counts[0].limited), (3, 2));
        assert!(metrics.render_prometheus().contains(
            "meshctl_http_local_rate_limit_descriptor_total{stat_prefix=\"local_rate_limit\",descriptor=\"meshctl_rate_limit=default/limits/0\",outcome=\"limited\"} 2"
        ));
        drop(new);
        assert!(metrics.local_rate_limit_descriptor_counts().is_empty());
    }
}
