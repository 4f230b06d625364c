//! Fault injection on the request path (Envoy's HTTP fault filter): a drawn delay is slept before
//! the request goes on, then a drawn abort replaces its forwarding; each is flagged (DI, FI).

use crate::model::fault::{FaultAbort, FaultPolicy};
use crate::telemetry::metrics::ListenerStats;
use crate::telemetry::resilience::ResponseFlag;

/// Applies `policy` to one request: sleeps the delay when drawn, and returns the abort when that
/// is drawn (the caller answers with it instead of forwarding).
pub async fn inject<'a>(policy: &'a FaultPolicy, stats: &ListenerStats) -> Option<&'a FaultAbort> {
    if let Some(delay) = policy.delay.as_ref().filter(|delay| delay.share.sample()) {
        stats.response_flags.record(ResponseFlag::DelayInjected);
        tokio::time::sleep(delay.duration).await;
    }
    let abort = policy.abort.as_ref().filter(|abort| abort.share.sample())?;
    stats.response_flags.record(ResponseFlag::FaultInjected);
    Some(abort)
}
