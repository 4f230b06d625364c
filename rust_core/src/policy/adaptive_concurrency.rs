//! Envoy's adaptive concurrency gradient controller: admits requests while fewer than the limit are
//! outstanding, and moves the limit by how far the measured latency has drifted from the minimum.
//!
//! The request path touches atomics only: admission is one compare-and-swap on the outstanding
//! count, a finished request one decrement and one histogram bucket. The limit is recomputed under
//! a lock by the request that finds a recompute due (Envoy uses timers; here the first completion
//! past the deadline does the work, so a quiet controller costs nothing). Time is passed in, so the
//! arithmetic is tested without sleeping.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::telemetry::metrics::AdaptiveConcurrencyStats;

/// The gradient is clamped to this range so one window never more than halves or doubles the limit.
const MIN_GRADIENT: f64 = 0.5;
const MAX_GRADIENT: f64 = 2.0;
/// After this many windows in a row that set the limit to min_concurrency, the minimum RTT is
/// probably wrong (measured under load): it is measured again at once, as Envoy does.
const MIN_LIMIT_WINDOWS_BEFORE_REMEASURE: u32 = 5;

/// GradientControllerConfig, defaults applied.
#[derive(Debug, Clone, Serialize)]
pub struct GradientSettings {
    /// sample_aggregate_percentile as a fraction (0.5: the median latency of a window).
    pub percentile: f64,
    pub max_limit: u32,
    /// concurrency_limit_params.min_concurrency_limit: the lowest limit a window may compute
    /// (default: min_concurrency).
    pub min_limit: u32,
    #[serde(with = "crate::model::millis")]
    pub update_interval: Duration,
    pub min_rtt: MinRttSource,
    /// The limit while the minimum RTT is being measured.
    pub min_concurrency: u32,
    /// buffer as a fraction: latency within minRTT × (1 + buffer) still lets the limit grow.
    pub buffer: f64,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MinRttSource {
    /// Measured every `interval` (plus up to `jitter` of it) from `request_count` requests
    /// admitted at min_concurrency.
    Sampled {
        #[serde(with = "crate::model::millis")]
        interval: Duration,
        request_count: u32,
        jitter: f64,
    },
    /// min_rtt_calc_params.fixed_value (interval 0): never measured.
    Fixed {
        #[serde(with = "crate::model::millis")]
        value: Duration,
    },
}

/// One filter config's controller; a new config starts a new one (as Envoy's).
#[derive(Debug)]
pub struct GradientController {
    settings: GradientSettings,
    limit: AtomicU32,
    outstanding: AtomicU32,
    samples: LatencyHistogram,
    /// Instants below are nanoseconds since `origin`, so they fit in atomics.
    origin: Instant,
    in_min_rtt_window: AtomicBool,
    /// Requests started before the current minimum-RTT window are not its samples.
    min_rtt_epoch: AtomicU64,
    /// When a completion must take the lock (a window to close or to open).
    next_deadline: AtomicU64,
    state: Mutex<State>,
    stats: Arc<AdaptiveConcurrencyStats>,
}

#[derive(Debug)]
struct State {
    min_rtt: Duration,
    /// The limit to go back to when the minimum-RTT window closes.
    deferred_limit: u32,
    next_sample_reset: u64,
    next_min_rtt_window: u64,
    windows_at_min_concurrency: u32,
}

impl GradientController {
    pub fn new(settings: GradientSettings, stats: Arc<AdaptiveConcurrencyStats>, now: Instant) -> Self {
        let update = settings.update_interval.as_nanos() as u64;
        let controller = GradientController {
            limit: AtomicU32::new(settings.min_concurrency),
            outstanding: AtomicU32::new(0),
            samples: LatencyHistogram::default(),
            origin: now,
            in_min_rtt_window: AtomicBool::new(false),
            min_rtt_epoch: AtomicU64::new(0),
            next_deadline: AtomicU64::new(update),
            state: Mutex::new(State {
                min_rtt: Duration::ZERO,
                deferred_limit: settings.min_concurrency,
                next_sample_reset: update,
                next_min_rtt_window: u64::MAX,
                windows_at_min_concurrency: 0,
            }),
            stats,
            settings,
        };
        {
            let mut state = controller.state.lock().unwrap();
            match controller.settings.min_rtt {
                MinRttSource::Sampled { .. } => controller.enter_min_rtt_window(&mut state, 0),
                MinRttSource::Fixed { value } => {
                    state.min_rtt = value;
                    controller.stats.min_rtt_msecs.store(value.as_millis() as u64, Relaxed);
                }
            }
        }
        controller.stats.concurrency_limit.store(u64::from(controller.limit()), Relaxed);
        controller
    }

    pub fn limit(&self) -> u32 {
        self.limit.load(Relaxed)
    }

    #[cfg(test)]
    fn outstanding(&self) -> u32 {
        self.outstanding.load(Relaxed)
    }

    /// Admits the request if fewer than the limit are outstanding (it then counts until the
    /// returned admission completes or drops); None: shed it (counted in rq_blocked).
    pub fn admit(&self, now: Instant) -> Option<Admission<'_>> {
        let limit = self.limit();
        match self.outstanding.fetch_update(Relaxed, Relaxed, |n| (n < limit).then_some(n + 1)) {
            Ok(_) => Some(Admission { controller: self, started: now }),
            Err(_) => {
                self.stats.rq_blocked.fetch_add(1, Relaxed);
                None
            }
        }
    }

    fn nanos(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.origin).as_nanos() as u64
    }

    /// A request admitted at `started` finished at `now`: its latency is a sample.
    fn record(&self, started: Instant, now: Instant) {
        self.outstanding.fetch_sub(1, Relaxed);
        let now_nanos = self.nanos(now);
        if self.nanos(started) < self.min_rtt_epoch.load(Relaxed) {
            // Started before the minimum-RTT window: not a sample at min_concurrency.
            return;
        }
        let count = self.samples.insert(now.saturating_duration_since(started));
        let window_full = match self.settings.min_rtt {
            MinRttSource::Sampled { request_count, .. } => {
                self.in_min_rtt_window.load(Relaxed) && count >= u64::from(request_count)
            }
            MinRttSource::Fixed { .. } => false,
        };
        if window_full || now_nanos >= self.next_deadline.load(Relaxed) {
            // One request recomputes; the others go on (their samples land in the next window).
            if let Ok(mut state) = self.state.try_lock() {
                self.tick(&mut state, now_nanos);
            }
        }
    }

    /// The periodic work due at `now`: close a full minimum-RTT window, open one, or compute a
    /// new limit from the window's samples.
    fn tick(&self, state: &mut State, now: u64) {
        if self.in_min_rtt_window.load(Relaxed) {
            self.update_min_rtt(state, now);
            return;
        }
        if now >= state.next_min_rtt_window {
            self.enter_min_rtt_window(state, now);
            return;
        }
        if now >= state.next_sample_reset {
            if let Some(sample_rtt) = self.samples.take_percentile(self.settings.percentile) {
                self.stats.sample_rtt_msecs.store(sample_rtt.as_millis() as u64, Relaxed);
                let limit = self.new_limit(state.min_rtt, sample_rtt);
                self.set_limit(state, limit, now);
            }
            state.next_sample_reset = now + self.settings.update_interval.as_nanos() as u64;
        }
        self.next_deadline.store(state.next_sample_reset.min(state.next_min_rtt_window), Relaxed);
    }

    fn enter_min_rtt_window(&self, state: &mut State, now: u64) {
        state.deferred_limit = self.limit();
        self.in_min_rtt_window.store(true, Relaxed);
        self.stats.min_rtt_calculation_active.store(1, Relaxed);
        self.set_limit(state, self.settings.min_concurrency, now);
        // Samples of requests admitted above min_concurrency do not tell the minimum.
        self.samples.clear();
        self.min_rtt_epoch.store(now, Relaxed);
        // Only a full window (request_count samples) closes it.
        self.next_deadline.store(u64::MAX, Relaxed);
    }

    fn update_min_rtt(&self, state: &mut State, now: u64) {
        let MinRttSource::Sampled { interval, request_count, jitter } = self.settings.min_rtt else { return };
        if self.samples.count() < u64::from(request_count) {
            return;
        }
        if let Some(min_rtt) = self.samples.take_percentile(self.settings.percentile) {
            state.min_rtt = min_rtt;
            self.stats.min_rtt_msecs.store(min_rtt.as_millis() as u64, Relaxed);
        }
        // Restored while still in the window, so it does not count as a window at min_concurrency.
        self.set_limit(state, state.deferred_limit, now);
        self.in_min_rtt_window.store(false, Relaxed);
        self.stats.min_rtt_calculation_active.store(0, Relaxed);
        let interval = interval.as_nanos() as u64;
        let jitter_range = (interval as f64 * jitter).ceil() as u64;
        let jittered = if jitter_range == 0 { 0 } else { fastrand::u64(..jitter_range) };
        state.next_min_rtt_window = now + interval + jittered;
        state.next_sample_reset = now + self.settings.update_interval.as_nanos() as u64;
        self.next_deadline.store(state.next_sample_reset.min(state.next_min_rtt_window), Relaxed);
    }

    /// limit × gradient, plus the square root of that as headroom for bursts, within bounds.
    fn new_limit(&self, min_rtt: Duration, sample_rtt: Duration) -> u32 {
        let buffered_min_rtt = min_rtt.as_secs_f64() * (1.0 + self.settings.buffer);
        let sample = sample_rtt.as_secs_f64().max(1e-9);
        let gradient = (buffered_min_rtt / sample).clamp(MIN_GRADIENT, MAX_GRADIENT);
        let limit = f64::from(self.limit()) * gradient;
        let headroom = limit.sqrt();
        self.stats.burst_queue_size.store(headroom as u64, Relaxed);
        // As Envoy: the upper bound first, then the lower one, which wins if they cross.
        ((limit + headroom) as u32).min(self.settings.max_limit).max(self.settings.min_limit)
    }

    fn set_limit(&self, state: &mut State, limit: u32, now: u64) {
        let old = self.limit.swap(limit, Relaxed);
        self.stats.concurrency_limit.store(u64::from(limit), Relaxed);
        let min = self.settings.min_concurrency;
        if !self.in_min_rtt_window.load(Relaxed) && old == min && limit == min {
            state.windows_at_min_concurrency += 1;
        } else {
            state.windows_at_min_concurrency = 0;
        }
        if state.windows_at_min_concurrency >= MIN_LIMIT_WINDOWS_BEFORE_REMEASURE && matches!(self.settings.min_rtt, MinRttSource::Sampled { .. }) {
            state.next_min_rtt_window = now;
        }
    }
}

/// An admitted request. `complete` records its latency; dropped without it (the client went
/// away, the request was reset), it only stops counting as outstanding, as Envoy's onDestroy.
#[derive(Debug)]
pub struct Admission<'a> {
    controller: &'a GradientController,
    started: Instant,
}

impl Admission<'_> {
    pub fn complete(self, now: Instant) {
        let this = std::mem::ManuallyDrop::new(self);
        this.controller.record(this.started, now);
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        self.controller.outstanding.fetch_sub(1, Relaxed);
    }
}

/// Sub-buckets per power of two of microseconds: a bucket is 1/8 of its octave wide, so a
/// percentile read from its middle is within about 6 %.
const SUB_BUCKET_BITS: u32 = 3;
const SUB_BUCKETS: usize = 1 << SUB_BUCKET_BITS;
/// Exact microseconds below 2 × SUB_BUCKETS, then 8 buckets per octave up to 2^40 µs (12 days).
const LINEAR: usize = 2 * SUB_BUCKETS;
const OCTAVES: usize = 40 - (SUB_BUCKET_BITS as usize + 1);
const BUCKETS: usize = LINEAR + OCTAVES * SUB_BUCKETS;

/// A window's latencies in fixed log-linear buckets: bounded memory, lock-free inserts.
struct LatencyHistogram {
    buckets: [AtomicU64; BUCKETS],
    count: AtomicU64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram { buckets: std::array::from_fn(|_| AtomicU64::new(0)), count: AtomicU64::new(0) }
    }
}

impl std::fmt::Debug for LatencyHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LatencyHistogram").field("count", &self.count()).finish_non_exhaustive()
    }
}

impl LatencyHistogram {
    /// Adds a sample; the window's count with it.
    fn insert(&self, latency: Duration) -> u64 {
        self.buckets[bucket_of(latency.as_micros() as u64)].fetch_add(1, Relaxed);
        self.count.fetch_add(1, Relaxed) + 1
    }

    fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    fn clear(&self) {
        self.count.store(0, Relaxed);
        for bucket in &self.buckets {
            bucket.store(0, Relaxed);
        }
    }

    /// The `percentile` (0 to 1) of the window's samples, emptying it; None when it is empty.
    fn take_percentile(&self, percentile: f64) -> Option<Duration> {
        self.count.store(0, Relaxed);
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.swap(0, Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((percentile * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (index, count) in counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Some(Duration::from_micros(bucket_middle(index)));
            }
        }
        None
    }
}

fn bucket_of(micros: u64) -> usize {
    if micros < LINEAR as u64 {
        return micros as usize;
    }
    let octave = 63 - micros.leading_zeros(); // ≥ SUB_BUCKET_BITS + 1
    let sub = (micros >> (octave - SUB_BUCKET_BITS)) as usize & (SUB_BUCKETS - 1);
    (LINEAR + (octave as usize - SUB_BUCKET_BITS as usize - 1) * SUB_BUCKETS + sub).min(BUCKETS - 1)
}

fn bucket_middle(index: usize) -> u64 {
    if index < LINEAR {
        return index as u64;
    }
    let octave = (index - LINEAR) / SUB_BUCKETS + SUB_BUCKET_BITS as usize + 1;
    let sub = ((index - LINEAR) % SUB_BUCKETS) as u64;
    let width = 1u64 << (octave - SUB_BUCKET_BITS as usize);
    (1u64 << octave) + sub * width + width / 2
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn settings(min_rtt: MinRttSource) -> GradientSettings {
        GradientSettings {
            percentile: 0.5,
            max_limit: 1000,
            min_limit: 3,
            update_interval: 100 * MS,
            min_rtt,
            min_concurrency: 3,
            buffer: 0.25,
        }
    }

    fn sampled(request_count: u32) -> MinRttSource {
        MinRttSource::Sampled { interval: Duration::from_secs(60), request_count, jitter: 0.0 }
    }

    /// `count` requests admitted at `at`, each taking `latency`.
    fn run(controller: &GradientController, at: Instant, latency: Duration, count: usize) {
        for _ in 0..count {
            let admission = controller.admit(at).expect("admitted");
            admission.complete(at + latency);
        }
    }

    #[test]
    fn the_histogram_reads_percentiles_within_its_bucket_width() {
        for micros in [0, 5, 15, 16, 17, 100, 999, 50_000, 1_234_567] {
            let middle = bucket_middle(bucket_of(micros));
            assert!((middle as f64 - micros as f64).abs() <= micros as f64 * 0.07 + 1.0, "{micros} → {middle}");
        }
        let histogram = LatencyHistogram::default();
        for ms in 1..=100 {
            histogram.insert(ms * MS);
        }
        let median = histogram.take_percentile(0.5).unwrap();
        assert!((47 * MS..=53 * MS).contains(&median), "{median:?}");
        assert_eq!(histogram.take_percentile(0.5), None, "taking empties the window");
    }

    #[test]
    fn admission_stops_at_the_limit_and_counts_the_blocked() {
        let stats = Arc::new(AdaptiveConcurrencyStats::default());
        let now = Instant::now();
        let controller = GradientController::new(settings(sampled(50)), stats.clone(), now);
        // While the minimum RTT is measured the limit is min_concurrency.
        assert_eq!(controller.limit(), 3);
        let held: Vec<_> = (0..3).map(|_| controller.admit(now).unwrap()).collect();
        assert!(controller.admit(now).is_none());
        assert_eq!(stats.rq_blocked.load(Relaxed), 1);
        drop(held); // reset requests: no longer outstanding, no sample
        assert_eq!(controller.outstanding(), 0);
        assert_eq!(controller.samples.count(), 0);
        assert!(controller.admit(now).is_some());
    }

    #[test]
    fn the_min_rtt_window_closes_after_request_count_samples_and_restores_the_limit() {
        let stats = Arc::new(AdaptiveConcurrencyStats::default());
        let start = Instant::now();
        let controller = GradientController::new(settings(sampled(10)), stats.clone(), start);
        run(&controller, start, 10 * MS, 9);
        assert_eq!(stats.min_rtt_calculation_active.load(Relaxed), 1);
        run(&controller, start, 10 * MS, 1);
        assert_eq!(stats.min_rtt_calculation_active.load(Relaxed), 0);
        // 10 ms reads as its bucket's middle, 9.7 ms.
        assert_eq!(stats.min_rtt_msecs.load(Relaxed), 9);
        // The limit before the window (min_concurrency at start) comes back.
        assert_eq!(controller.limit(), 3);
    }

    #[test]
    fn the_limit_grows_while_latency_stays_near_the_minimum_and_shrinks_when_it_rises() {
        let stats = Arc::new(AdaptiveConcurrencyStats::default());
        let start = Instant::now();
        let controller = GradientController::new(settings(sampled(10)), stats.clone(), start);
        run(&controller, start, 10 * MS, 10); // minRTT 10 ms, the window closes at start + 10 ms
        let mut at = start + 10 * MS;
        let mut limits = vec![];
        for _ in 0..4 {
            at += 101 * MS;
            // Latency at the minimum: gradient (minRTT × 1.25) / minRTT = 1.25.
            run(&controller, at, 10 * MS, 1);
            limits.push(controller.limit());
        }
        // 3 × 1.25 + √3.75 = 5.69 → 5; 8.75 → 8; 13.16 → 13; 20.28 → 20.
        assert_eq!(limits, [5, 8, 13, 20]);
        assert_eq!(stats.sample_rtt_msecs.load(Relaxed), 9);
        // Latency four times the minimum: the gradient is clamped to 0.5: 20 × 0.5 + √10 = 13.16.
        at += 101 * MS;
        run(&controller, at, 40 * MS, 1);
        assert_eq!(controller.limit(), 13);
        assert_eq!(stats.burst_queue_size.load(Relaxed), 3);
    }

    #[test]
    fn the_limit_stays_within_its_bounds() {
        let stats = Arc::new(AdaptiveConcurrencyStats::default());
        let start = Instant::now();
        let mut bounded = settings(MinRttSource::Fixed { value: 10 * MS });
        bounded.max_limit = 6;
        bounded.min_limit = 2;
        let controller = GradientController::new(bounded, stats, start);
        assert_eq!(controller.limit(), 3, "a fixed minRTT starts at min_concurrency");
        run(&controller, start + 101 * MS, MS, 1);
        run(&controller, start + 202 * MS, MS, 1);
        assert_eq!(controller.limit(), 6);
        for window in 3..10 {
            run(&controller, start + window * 101 * MS, Duration::from_secs(1), 1);
        }
        assert_eq!(controller.limit(), 2);
    }

    #[test]
    fn the_min_rtt_is_measured_again_after_five_windows_at_min_concurrency_and_after_its_interval() {
        let stats = Arc::new(AdaptiveConcurrencyStats::default());
        let start = Instant::now();
        let controller = GradientController::new(settings(sampled(5)), stats.clone(), start);
        run(&controller, start, 10 * MS, 5);
        // Each window at 1 s latency pins the limit at min_concurrency (3).
        for window in 1..=5 {
            run(&controller, start + window * 101 * MS, Duration::from_secs(1), 1);
            assert_eq!(stats.min_rtt_calculation_active.load(Relaxed), 0, "window {window}");
        }
        // The fifth made the measure due at once: the next completion opens the window.
        run(&controller, start + 1600 * MS, MS, 1);
        assert_eq!(stats.min_rtt_calculation_active.load(Relaxed), 1);
        // A request admitted before the window opened is no sample of it.
        let early = controller.admit(start + 1600 * MS);
        run(&controller, start + 1700 * MS, 20 * MS, 5);
        assert_eq!(stats.min_rtt_calculation_active.load(Relaxed), 0);
        assert_eq!(stats.min_rtt_msecs.load(Relaxed), 19, "20 ms, read as its bucket's middle");
        drop(early);
        assert_eq!(controller.outstanding(), 0);
        // And on schedule: the interval (60 s, no jitter) after the window closed.
        run(&controller, start + Duration::from_secs(62), 20 * MS, 1);
        assert_eq!(stats.min_rtt_calculation_active.load(Relaxed), 1);
        assert_eq!(controller.limit(), 3);
    }
}
