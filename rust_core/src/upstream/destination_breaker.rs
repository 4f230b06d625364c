//! The Fallback's destination breaker at run time: a sliding window of call outcomes that opens
//! it, the open time, and the single half-open probe that closes it again.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::model::fallback::BreakerConfig;

/// The window is kept as this many buckets, each a tenth of it: old outcomes leave a tenth at a
/// time (resilience4j's time-based window does the same with one-second buckets).
const BUCKETS: usize = 10;

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    calls: u32,
    failures: u32,
    slow: u32,
}

#[derive(Debug)]
enum Phase {
    Closed,
    Open { until: Instant },
    /// One probe is allowed through; `probing` while it is under way.
    HalfOpen { probing: bool },
}

#[derive(Debug)]
struct State {
    phase: Phase,
    buckets: [Bucket; BUCKETS],
    /// The bucket now filling, and when it began.
    current: usize,
    current_since: Instant,
}

/// What the breaker lets a request do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Call,
    /// The one call let through a half-open breaker: its outcome decides.
    Probe,
    Rejected,
}

#[derive(Debug)]
pub struct DestinationBreaker {
    config: BreakerConfig,
    state: Mutex<State>,
    /// 1 while open or half-open (meshctl_fallback_breaker_open), shared with the metrics.
    open_gauge: Arc<AtomicU64>,
}

impl DestinationBreaker {
    pub fn new(config: BreakerConfig, open_gauge: Arc<AtomicU64>, now: Instant) -> Self {
        open_gauge.store(0, Relaxed);
        let state = State { phase: Phase::Closed, buckets: [Bucket::default(); BUCKETS], current: 0, current_since: now };
        DestinationBreaker { config, state: Mutex::new(state), open_gauge }
    }

    pub fn admit(&self, now: Instant) -> Admission {
        let mut state = self.state.lock().unwrap();
        match state.phase {
            Phase::Closed => Admission::Call,
            Phase::Open { until } if now >= until => {
                state.phase = Phase::HalfOpen { probing: true };
                Admission::Probe
            }
            Phase::Open { .. } | Phase::HalfOpen { probing: true } => Admission::Rejected,
            Phase::HalfOpen { probing: false } => {
                state.phase = Phase::HalfOpen { probing: true };
                Admission::Probe
            }
        }
    }

    /// The outcome of a call `admit` let through; `elapsed` is the time to its response head.
    pub fn record(&self, admission: Admission, failed: bool, elapsed: Duration, now: Instant) {
        let slow = self.config.slow_call_duration.is_some_and(|limit| elapsed >= limit);
        let mut state = self.state.lock().unwrap();
        match admission {
            Admission::Rejected => {}
            Admission::Probe => {
                if failed || slow {
                    self.open(&mut state, now);
                } else {
                    state.phase = Phase::Closed;
                    state.buckets = [Bucket::default(); BUCKETS];
                    state.current_since = now;
                    self.open_gauge.store(0, Relaxed);
                }
            }
            // A call admitted while closed may end after the breaker opened: it is counted only
            // while the window is what decides.
            Admission::Call if matches!(state.phase, Phase::Closed) => {
                self.advance(&mut state, now);
                let current = state.current;
                let bucket = &mut state.buckets[current];
                bucket.calls += 1;
                bucket.failures += u32::from(failed);
                bucket.slow += u32::from(slow);
                if self.trips(&state) {
                    self.open(&mut state, now);
                }
            }
            Admission::Call => {}
        }
    }

    /// A probe whose request went away before an outcome: the next request probes instead.
    pub fn abandon_probe(&self) {
        let mut state = self.state.lock().unwrap();
        if matches!(state.phase, Phase::HalfOpen { probing: true }) {
            state.phase = Phase::HalfOpen { probing: false };
        }
    }

    fn open(&self, state: &mut State, now: Instant) {
        state.phase = Phase::Open { until: now + self.config.open_for };
        self.open_gauge.store(1, Relaxed);
    }

    fn trips(&self, state: &State) -> bool {
        let total = state.buckets.iter().fold(Bucket::default(), |sum, b| Bucket {
            calls: sum.calls + b.calls,
            failures: sum.failures + b.failures,
            slow: sum.slow + b.slow,
        });
        if total.calls < self.config.min_requests {
            return false;
        }
        let reaches = |count: u32, ratio: Option<f64>| ratio.is_some_and(|r| f64::from(count) >= r * f64::from(total.calls));
        reaches(total.failures, self.config.error_ratio) || reaches(total.slow, self.config.slow_call_ratio)
    }

    /// Move the current bucket on to `now`, emptying the buckets that fell out of the window.
    fn advance(&self, state: &mut State, now: Instant) {
        let width = self.config.window / BUCKETS as u32;
        let passed = now.saturating_duration_since(state.current_since);
        if passed < width {
            return;
        }
        let steps = (passed.as_nanos() / width.as_nanos().max(1)) as usize;
        for step in 1..=steps.min(BUCKETS) {
            let index = (state.current + step) % BUCKETS;
            state.buckets[index] = Bucket::default();
        }
        state.current = (state.current + steps) % BUCKETS;
        state.current_since += width * steps as u32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(min_requests: u32) -> DestinationBreaker {
        let config = BreakerConfig {
            error_ratio: Some(0.5),
            slow_call_ratio: Some(0.5),
            slow_call_duration: Some(Duration::from_millis(100)),
            min_requests,
            window: Duration::from_secs(10),
            open_for: Duration::from_secs(5),
        };
        DestinationBreaker::new(config, Arc::default(), Instant::now())
    }

    fn call(b: &DestinationBreaker, failed: bool, elapsed_ms: u64, now: Instant) -> Admission {
        let admission = b.admit(now);
        b.record(admission, failed, Duration::from_millis(elapsed_ms), now);
        admission
    }

    #[test]
    fn opens_at_the_error_ratio_only_after_min_requests() {
        let now = Instant::now();
        let b = breaker(4);
        for _ in 0..3 {
            assert_eq!(call(&b, true, 1, now), Admission::Call); // 3 of 3 failed, under min_requests
        }
        assert_eq!(call(&b, false, 1, now), Admission::Call); // 3 of 4: 75 % >= 50 %: opens
        assert_eq!(b.admit(now), Admission::Rejected);
        assert_eq!(b.open_gauge.load(Relaxed), 1);
    }

    #[test]
    fn slow_calls_open_it_too() {
        let now = Instant::now();
        let b = breaker(2);
        call(&b, false, 150, now);
        call(&b, false, 150, now);
        assert_eq!(b.admit(now), Admission::Rejected);
    }

    #[test]
    fn one_probe_after_open_for_closes_or_reopens_it() {
        let start = Instant::now();
        let b = breaker(2);
        call(&b, true, 1, start);
        call(&b, true, 1, start);
        let later = start + Duration::from_secs(5);
        assert_eq!(b.admit(later), Admission::Probe);
        assert_eq!(b.admit(later), Admission::Rejected, "one probe at a time");
        b.record(Admission::Probe, true, Duration::from_millis(1), later);
        assert_eq!(b.admit(later + Duration::from_secs(1)), Admission::Rejected, "open again");
        let after = later + Duration::from_secs(5);
        assert_eq!(b.admit(after), Admission::Probe);
        b.record(Admission::Probe, false, Duration::from_millis(1), after);
        assert_eq!(b.admit(after), Admission::Call);
        assert_eq!(b.open_gauge.load(Relaxed), 0);
        // Closed afresh: one more failure does not reopen it (the old window is gone).
        assert_eq!(call(&b, true, 1, after), Admission::Call);
        assert_eq!(b.admit(after), Admission::Call);
    }

    #[test]
    fn an_abandoned_probe_lets_the_next_request_probe() {
        let start = Instant::now();
        let b = breaker(1);
        call(&b, true, 1, start);
        let later = start + Duration::from_secs(6);
        assert_eq!(b.admit(later), Admission::Probe);
        b.abandon_probe();
        assert_eq!(b.admit(later), Admission::Probe);
    }

    #[test]
    fn failures_older_than_the_window_no_longer_count() {
        let start = Instant::now();
        let b = breaker(3);
        call(&b, true, 1, start);
        call(&b, true, 1, start);
        let later = start + Duration::from_secs(11);
        call(&b, true, 1, later); // the two earlier ones have left the window: 1 call
        assert_eq!(b.admit(later), Admission::Call);
    }
}
