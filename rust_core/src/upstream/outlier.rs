//! Outlier detection as Envoy's: per-endpoint failure counters kept with atomics on the request
//! path, and a per-cluster detector that ejects endpoints and returns them at its interval sweeps.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use serde_json::{json, Value};
use tokio::time::Instant;

use super::lb::EndpointSet;
use crate::model::outlier::OutlierDetection;
use crate::telemetry::metrics::{EjectionType, OutlierStats};

/// How an exchange ended below HTTP, in Envoy's terms (`Outlier::Result`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalResult {
    /// The request got a connection (Envoy's pool ready); its response is counted apart.
    ConnectSuccess,
    /// A connection was the whole exchange (TCP proxy) and it was made.
    ConnectSuccessFinal,
    /// No connection (refused, TLS failure, connect timeout), or the stream was reset.
    ConnectFailed,
    /// No response in time.
    Timeout,
}

/// Requests (low 32 bits) and successes (high 32 bits) counted during the current interval, in
/// one atomic: one add per request, and an interval's pair is taken whole.
#[derive(Debug, Default)]
struct RateCounters(AtomicU64);

const ONE_SUCCESS: u64 = 1 << 32;

impl RateCounters {
    fn record(&self, success: bool) {
        self.0.fetch_add(if success { ONE_SUCCESS + 1 } else { 1 }, Relaxed);
    }

    /// The interval just ended: its success rate in percent and its volume; a new one starts.
    fn take(&self) -> Option<(f64, u64)> {
        let counts = self.0.swap(0, Relaxed);
        let (total, success) = (counts & (ONE_SUCCESS - 1), counts >> 32);
        (total > 0).then(|| (success as f64 * 100.0 / total as f64, total))
    }
}

/// Ejection bookkeeping, touched only under the detector's lock (ejections and sweeps).
#[derive(Debug, Default)]
struct EjectionState {
    ejections: u64,
    /// The multiplier of base_ejection_time for the current or next ejection.
    backoff: u32,
    last_ejection: Option<Instant>,
    last_unejection: Option<Instant>,
    jitter: Duration,
}

/// One endpoint's view of outlier detection. Shared by the endpoint across endpoint updates
/// that keep its address (as Envoy keeps a host whose address is unchanged).
#[derive(Debug)]
pub struct HostMonitor {
    config: Arc<OutlierDetection>,
    detector: Weak<OutlierDetector>,
    consecutive_5xx: AtomicU32,
    consecutive_gateway_failure: AtomicU32,
    consecutive_local_origin_failure: AtomicU32,
    external: RateCounters,
    local_origin: RateCounters,
    ejected: AtomicBool,
    state: Mutex<EjectionState>,
}

/// Count one more failure; true when this one reaches the threshold. Envoy compares for
/// equality: a counter already past its threshold (its host ejected) fires no second time.
fn count_failure(counter: &AtomicU32, threshold: u32) -> bool {
    counter.fetch_add(1, Relaxed).wrapping_add(1) == threshold
}

fn reset(counter: &AtomicU32) {
    // Most successes find the counter at 0 already: a read keeps the cache line shared.
    if counter.load(Relaxed) != 0 {
        counter.store(0, Relaxed);
    }
}

impl HostMonitor {
    pub fn is_ejected(&self) -> bool {
        self.ejected.load(Relaxed)
    }

    /// An HTTP response's status (a gRPC status already mapped to one, as Envoy maps it).
    pub fn record_status(&self, status: u16) {
        let server_error = (500..600).contains(&status);
        self.external.record(!server_error);
        if !server_error {
            reset(&self.consecutive_5xx);
            reset(&self.consecutive_gateway_failure);
            return;
        }
        if matches!(status, 502..=504) {
            if count_failure(&self.consecutive_gateway_failure, self.config.consecutive_gateway_failure) {
                self.report(EjectionType::ConsecutiveGatewayFailure);
            }
        } else {
            reset(&self.consecutive_gateway_failure);
        }
        if count_failure(&self.consecutive_5xx, self.config.consecutive_5xx) {
            self.report(EjectionType::Consecutive5xx);
        }
    }

    /// An outcome below HTTP. Unless local-origin errors are split out, it counts as the status
    /// Envoy maps it to (a failed connection or reset 503, a timeout 504, a made connection 200).
    pub fn record_local(&self, result: LocalResult) {
        if self.config.split_external_local_origin_errors {
            match result {
                LocalResult::ConnectSuccess | LocalResult::ConnectSuccessFinal => {
                    self.local_origin.record(true);
                    reset(&self.consecutive_local_origin_failure);
                }
                LocalResult::ConnectFailed | LocalResult::Timeout => {
                    self.local_origin.record(false);
                    if count_failure(&self.consecutive_local_origin_failure, self.config.consecutive_local_origin_failure) {
                        self.report(EjectionType::ConsecutiveLocalOriginFailure);
                    }
                }
            }
            return;
        }
        match result {
            // Whether the server then failed is for its response status to say.
            LocalResult::ConnectSuccess => {}
            LocalResult::ConnectSuccessFinal => self.record_status(200),
            LocalResult::ConnectFailed => self.record_status(503),
            LocalResult::Timeout => self.record_status(504),
        }
    }

    /// A try given up for a timeout. Envoy reports it with the timeout's response code, 504,
    /// which counts when errors are not split; split, it is a local-origin failure.
    pub fn record_timeout(&self) {
        self.record_local(LocalResult::Timeout);
    }

    fn report(&self, kind: EjectionType) {
        // The cluster may have been replaced while this request was in flight: nothing to do.
        if let Some(detector) = self.detector.upgrade() {
            detector.on_consecutive_failure(self, kind);
        }
    }

    fn reset_consecutive(&self) {
        reset(&self.consecutive_5xx);
        reset(&self.consecutive_gateway_failure);
        reset(&self.consecutive_local_origin_failure);
    }

    /// For /config_dump: ejection state and the running counters.
    pub fn dump(&self) -> Value {
        let state = self.state.lock().unwrap();
        let mut dump = json!({
            "ejected": self.is_ejected(),
            "ejections": state.ejections,
            "ejection_time_multiplier": state.backoff,
            "consecutive_5xx": self.consecutive_5xx.load(Relaxed),
            "consecutive_gateway_failure": self.consecutive_gateway_failure.load(Relaxed),
            "consecutive_local_origin_failure": self.consecutive_local_origin_failure.load(Relaxed),
        });
        if let (true, Some(at)) = (self.is_ejected(), state.last_ejection) {
            let until = at + ejection_time(&self.config, state.backoff, state.jitter);
            // Back at the first interval sweep from then on.
            dump["ejected_until"] = json!(wall_clock(until));
        }
        dump
    }
}

/// How long an endpoint ejected with this multiplier stays out: k × base, capped, plus jitter.
fn ejection_time(config: &OutlierDetection, backoff: u32, jitter: Duration) -> Duration {
    (config.base_ejection_time * backoff).min(config.max_ejection_time) + jitter
}

fn wall_clock(at: Instant) -> String {
    let now = Instant::now();
    let system = if at >= now {
        std::time::SystemTime::now() + (at - now)
    } else {
        std::time::SystemTime::now() - (now - at)
    };
    time::OffsetDateTime::from(system)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// When the balancer last took the cluster's health, and whether a change waits for the merge
/// window to end (Envoy's cluster manager keeps the same per cluster).
#[derive(Debug, Default)]
pub struct Publishing {
    last: Option<Instant>,
    pending: bool,
}

/// A cluster's detector: decides ejections and returns endpoints, and rebuilds the set the
/// balancer picks from when that changes (at once, or at the end of the update merge window).
#[derive(Debug)]
pub struct OutlierDetector {
    config: Arc<OutlierDetection>,
    stats: Arc<OutlierStats>,
    /// The cluster's endpoints, shared with its runtime.
    endpoints: Arc<ArcSwap<EndpointSet>>,
    panic_threshold: u32,
    merge_window: Duration,
    /// Serializes ejections, sweeps and endpoint updates, and the rebuilds they cause.
    lock: Mutex<Publishing>,
}

impl OutlierDetector {
    pub fn new(
        config: OutlierDetection,
        stats: Arc<OutlierStats>,
        endpoints: Arc<ArcSwap<EndpointSet>>,
        panic_threshold: u32,
        merge_window: Duration,
    ) -> Arc<Self> {
        stats.configured.store(true, Relaxed);
        Arc::new(OutlierDetector {
            config: Arc::new(config),
            stats,
            endpoints,
            panic_threshold,
            merge_window,
            lock: Mutex::new(Publishing::default()),
        })
    }

    pub fn interval(&self) -> Duration {
        self.config.interval
    }

    /// A monitor for a new endpoint of this cluster.
    pub fn monitor(self: &Arc<Self>) -> Arc<HostMonitor> {
        Arc::new(HostMonitor {
            config: self.config.clone(),
            detector: Arc::downgrade(self),
            consecutive_5xx: AtomicU32::new(0),
            consecutive_gateway_failure: AtomicU32::new(0),
            consecutive_local_origin_failure: AtomicU32::new(0),
            external: RateCounters::default(),
            local_origin: RateCounters::default(),
            ejected: AtomicBool::new(false),
            state: Mutex::new(EjectionState::default()),
        })
    }

    /// Held while the cluster's endpoint set is replaced, so no ejection decision interleaves.
    pub fn lock(&self) -> MutexGuard<'_, Publishing> {
        self.lock.lock().unwrap()
    }

    /// The cluster's endpoints were replaced (a membership change, which Envoy never merges):
    /// the new set carries every endpoint's current health, so nothing waits any more.
    pub fn replaced(&self, publishing: &mut Publishing, set: &EndpointSet, initial: bool) {
        self.count_active(set);
        publishing.last = (!initial).then(Instant::now);
        publishing.pending = false;
    }

    /// Publish a new set built from `set`'s endpoints and their current health (lock held).
    fn rebuild(&self, set: &EndpointSet) {
        self.endpoints.store(Arc::new(EndpointSet::new(set.endpoints.clone(), self.panic_threshold)));
    }

    /// An endpoint's health changed: the balancer takes it now if its last change is older than
    /// the merge window, else once the window is over (with whatever else changed meanwhile).
    /// Unlike Envoy, which merges EDS health and weight changes the same way, meshctl applies
    /// every EDS update at once (it then restarts the window, as a membership change does).
    fn health_changed(self: &Arc<Self>, publishing: &mut Publishing, set: &EndpointSet, now: Instant) {
        self.count_active(set);
        let within_window = publishing.last.is_some_and(|at| now.saturating_duration_since(at) <= self.merge_window);
        let runtime = tokio::runtime::Handle::try_current();
        if self.merge_window.is_zero() || !within_window || runtime.is_err() {
            self.rebuild(set);
            publishing.last = Some(now);
            publishing.pending = false;
            return;
        }
        if publishing.pending {
            return;
        }
        publishing.pending = true;
        let detector = Arc::downgrade(self);
        let window = self.merge_window;
        if let Ok(runtime) = runtime {
            runtime.spawn(async move {
                tokio::time::sleep(window).await;
                let Some(detector) = detector.upgrade() else { return };
                let mut publishing = detector.lock();
                if publishing.pending {
                    detector.rebuild(&detector.endpoints.load());
                    publishing.last = Some(Instant::now());
                    publishing.pending = false;
                }
            });
        }
    }

    /// The ejections_active gauge counts ejected endpoints at once (the balancer may learn later).
    fn count_active(&self, set: &EndpointSet) {
        let active = set.endpoints.iter().filter(|e| e.is_ejected()).count();
        self.stats.ejections_active.store(active as u64, Relaxed);
    }

    fn on_consecutive_failure(self: &Arc<Self>, monitor: &HostMonitor, kind: EjectionType) {
        let mut publishing = self.lock();
        let set = self.endpoints.load();
        // A request still in flight to an endpoint removed since.
        if !set.endpoints.iter().any(|e| e.monitor().is_some_and(|m| std::ptr::eq(&**m, monitor))) {
            return;
        }
        if monitor.is_ejected() {
            return;
        }
        self.stats.detected(kind);
        let now = Instant::now();
        if self.eject(&set, monitor, kind, now) {
            self.health_changed(&mut publishing, &set, now);
        }
        // Reset even when not ejected, so that a further run of failures is detected again.
        match kind {
            EjectionType::Consecutive5xx => reset(&monitor.consecutive_5xx),
            EjectionType::ConsecutiveGatewayFailure => reset(&monitor.consecutive_gateway_failure),
            EjectionType::ConsecutiveLocalOriginFailure => reset(&monitor.consecutive_local_origin_failure),
            _ => {}
        }
    }

    /// Envoy's ejectHost: within max_ejection_percent (counting this one), and then with the
    /// chance `enforcing_*` gives. True if the endpoint was ejected. Lock held.
    fn eject(&self, set: &EndpointSet, monitor: &HostMonitor, kind: EjectionType, now: Instant) -> bool {
        let hosts = set.endpoints.len();
        let active = set.endpoints.iter().filter(|e| e.is_ejected()).count();
        let ejected_percent = 100.0 * (active + 1) as f64 / hosts.max(1) as f64;
        let within_limit = ejected_percent <= self.config.max_ejection_percent.min(100) as f64
            || (self.config.always_eject_one_host && active == 0);
        if !within_limit {
            self.stats.ejections_overflow.fetch_add(1, Relaxed);
            return false;
        }
        if !enforced(self.enforcing(kind)) {
            return false;
        }
        self.stats.enforced(kind);
        let mut state = monitor.state.lock().unwrap();
        state.ejections += 1;
        state.last_ejection = Some(now);
        let jitter_ms = self.config.max_ejection_time_jitter.as_millis() as u64;
        state.jitter = Duration::from_millis(fastrand::u64(..=jitter_ms));
        // The multiplier grows with each ejection until k × base passes the cap.
        if self.config.base_ejection_time * state.backoff < self.config.max_ejection_time + self.config.base_ejection_time {
            state.backoff += 1;
        }
        monitor.ejected.store(true, Relaxed);
        true
    }

    fn enforcing(&self, kind: EjectionType) -> u32 {
        let c = &self.config;
        match kind {
            EjectionType::Consecutive5xx => c.enforcing_consecutive_5xx,
            EjectionType::ConsecutiveGatewayFailure => c.enforcing_consecutive_gateway_failure,
            EjectionType::ConsecutiveLocalOriginFailure => c.enforcing_consecutive_local_origin_failure,
            EjectionType::SuccessRate => c.enforcing_success_rate,
            EjectionType::LocalOriginSuccessRate => c.enforcing_local_origin_success_rate,
            EjectionType::FailurePercentage => c.enforcing_failure_percentage,
            EjectionType::LocalOriginFailurePercentage => c.enforcing_failure_percentage_local_origin,
        }
    }

    /// The interval sweep: return endpoints whose ejection time is over, eject by success rate
    /// and failure percentage over the interval just ended, and let the ejection multiplier of
    /// endpoints back for an interval decay.
    pub fn sweep(self: &Arc<Self>, now: Instant) {
        let mut publishing = self.lock();
        let set = self.endpoints.load();
        let mut changed = false;
        let monitors: Vec<&Arc<HostMonitor>> = set.endpoints.iter().filter_map(|e| e.monitor()).collect();
        let mut external = Vec::with_capacity(monitors.len());
        let mut local_origin = Vec::with_capacity(monitors.len());
        for monitor in &monitors {
            if monitor.is_ejected() {
                let mut state = monitor.state.lock().unwrap();
                let ejected_at = state.last_ejection.unwrap_or(now);
                if now.saturating_duration_since(ejected_at) >= ejection_time(&self.config, state.backoff, state.jitter) {
                    monitor.ejected.store(false, Relaxed);
                    // Counters near their threshold would eject again on very few new errors.
                    monitor.reset_consecutive();
                    state.last_unejection = Some(now);
                    changed = true;
                }
            }
            // Every endpoint starts a new interval, ejected or not.
            external.push(monitor.external.take());
            local_origin.push(monitor.local_origin.take());
        }
        changed |= self.success_rate_ejections(&set, &monitors, &external, false, now);
        changed |= self.success_rate_ejections(&set, &monitors, &local_origin, true, now);
        for monitor in &monitors {
            if monitor.is_ejected() {
                continue;
            }
            let mut state = monitor.state.lock().unwrap();
            let back_for_an_interval =
                state.last_unejection.is_some_and(|at| now.saturating_duration_since(at) >= self.config.interval);
            if back_for_an_interval && state.backoff > 0 {
                state.backoff -= 1;
            }
        }
        if changed {
            self.health_changed(&mut publishing, &set, now);
        }
    }

    /// Envoy's processSuccessRateEjections for one origin. True if anything was ejected.
    fn success_rate_ejections(
        &self,
        set: &EndpointSet,
        monitors: &[&Arc<HostMonitor>],
        rates: &[Option<(f64, u64)>],
        local_origin: bool,
        now: Instant,
    ) -> bool {
        let c = &self.config;
        let hosts = monitors.len();
        if hosts < c.success_rate_minimum_hosts as usize && hosts < c.failure_percentage_minimum_hosts as usize {
            return false;
        }
        let mut success_rate_hosts = Vec::new();
        let mut failure_percentage_hosts = Vec::new();
        for (monitor, rate) in monitors.iter().zip(rates) {
            let Some((rate, volume)) = *rate else { continue };
            if monitor.is_ejected() {
                continue;
            }
            if volume >= c.success_rate_request_volume as u64 {
                success_rate_hosts.push((*monitor, rate));
            }
            if volume >= c.failure_percentage_request_volume as u64 {
                failure_percentage_hosts.push((*monitor, rate));
            }
        }
        let (success_rate_kind, failure_percentage_kind) = if local_origin {
            (EjectionType::LocalOriginSuccessRate, EjectionType::LocalOriginFailurePercentage)
        } else {
            (EjectionType::SuccessRate, EjectionType::FailurePercentage)
        };
        let mut ejected = false;
        if !success_rate_hosts.is_empty() && success_rate_hosts.len() >= c.success_rate_minimum_hosts as usize {
            let threshold = success_rate_threshold(&success_rate_hosts, c.success_rate_stdev_factor as f64 / 1000.0);
            for (monitor, rate) in &success_rate_hosts {
                if *rate < threshold {
                    self.stats.detected(success_rate_kind);
                    ejected |= self.eject(set, monitor, success_rate_kind, now);
                }
            }
        }
        if !failure_percentage_hosts.is_empty() && failure_percentage_hosts.len() >= c.failure_percentage_minimum_hosts as usize {
            for (monitor, rate) in &failure_percentage_hosts {
                if 100.0 - rate >= c.failure_percentage_threshold as f64 {
                    self.stats.detected(failure_percentage_kind);
                    // Envoy would eject (and count) a host twice when both detectors fire on it
                    // in one sweep; once is enough.
                    if !monitor.is_ejected() {
                        ejected |= self.eject(set, monitor, failure_percentage_kind, now);
                    }
                }
            }
        }
        ejected
    }
}

/// mean − factor × standard deviation (of the population) of the hosts' success rates.
fn success_rate_threshold(hosts: &[(&Arc<HostMonitor>, f64)], stdev_factor: f64) -> f64 {
    let n = hosts.len() as f64;
    let mean = hosts.iter().map(|(_, rate)| rate).sum::<f64>() / n;
    let variance = hosts.iter().map(|(_, rate)| (rate - mean).powi(2)).sum::<f64>() / n;
    mean - stdev_factor * variance.sqrt()
}

/// Envoy's featureEnabled(percent): a draw below the percentage.
fn enforced(percent: u32) -> bool {
    percent >= 100 || (percent > 0 && fastrand::u32(..100) < percent)
}

/// Run a detector's interval sweeps until the detector is gone (its cluster removed or replaced).
pub async fn run_sweeps(detector: Weak<OutlierDetector>, interval: Duration) {
    let mut ticks = tokio::time::interval_at(Instant::now() + interval, interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let now = ticks.tick().await;
        let Some(detector) = detector.upgrade() else { return };
        detector.sweep(now);
    }
}

/// gRPC status → HTTP status, as Envoy's Grpc::Utility::grpcToHttpStatus maps it for outlier
/// detection (a trailers-only gRPC error arrives with HTTP 200).
pub fn grpc_status_to_http(grpc_status: &[u8]) -> u16 {
    let code = std::str::from_utf8(grpc_status).ok().and_then(|s| s.trim().parse::<u32>().ok());
    match code {
        Some(0) => 200,
        Some(1) => 499,
        Some(2) => 500,
        Some(3) => 400,
        Some(4) => 504,
        Some(5) => 404,
        Some(6) => 409,
        Some(7) => 403,
        Some(8) => 429,
        Some(9) => 400,
        Some(10) => 409,
        Some(11) => 400,
        Some(12) => 501,
        Some(13) => 500,
        Some(14) => 503,
        Some(15) => 500,
        Some(16) => 401,
        _ => 500,
    }
}

#[cfg(test)]
#[path = "outlier_tests.rs"]
mod tests;
