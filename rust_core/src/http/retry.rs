//! Retry decisions (Envoy's RetryState): whether a failed try is tried again, the backoff before
//! it, and the cluster's retry breaker. Made per request only when its route has a retry policy.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, Response, StatusCode};

use crate::model::retry::{RetryOn, RetryPolicy};
use crate::upstream::circuit_breaker::RetrySlot;
use crate::upstream::pool::UpstreamError;
use crate::upstream::ClusterRuntime;

/// What became of a failed try that the policy would retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Try again after this backoff.
    Retry(Duration),
    /// num_retries are used up (flag URX).
    LimitExceeded,
    /// The cluster's retry breaker or budget is full (flag UO).
    Overflow,
}

pub struct RetryState<'a> {
    policy: &'a RetryPolicy,
    cluster: &'a Arc<ClusterRuntime>,
    retries_left: u32,
    /// The next backoff's upper bound: doubles after each retry, up to the maximum.
    next_interval: Duration,
    /// The retry whose try is under way holds a slot of the retry breaker until it is done.
    in_flight: Option<RetrySlot>,
    /// The endpoint of the try under way, and those tried before it, for the previous_hosts
    /// predicate: apart, so that a request that is never retried allocates nothing.
    current: Option<SocketAddr>,
    earlier: Vec<SocketAddr>,
}

impl<'a> RetryState<'a> {
    pub fn new(policy: &'a RetryPolicy, cluster: &'a Arc<ClusterRuntime>) -> Self {
        RetryState {
            policy,
            cluster,
            retries_left: policy.num_retries,
            next_interval: policy.backoff.base_interval,
            in_flight: None,
            current: None,
            earlier: Vec::new(),
        }
    }

    pub fn policy(&self) -> &RetryPolicy {
        self.policy
    }

    /// A try is starting on `endpoint`.
    pub fn tried(&mut self, endpoint: SocketAddr) {
        if self.policy.avoid_previous_hosts {
            if let Some(previous) = self.current.replace(endpoint) {
                self.earlier.push(previous);
            }
        }
    }

    /// Whether a retry should avoid `endpoint` (the previous_hosts predicate).
    pub fn avoids(&self, endpoint: SocketAddr) -> bool {
        self.current == Some(endpoint) || self.earlier.contains(&endpoint)
    }

    /// Picks a retry makes to find an endpoint it does not avoid (Envoy's
    /// host_selection_retry_max_attempts + 1).
    pub fn host_selection_attempts(&self) -> u32 {
        if self.policy.avoid_previous_hosts {
            self.policy.host_selection_retry_max_attempts + 1
        } else {
            1
        }
    }

    /// A try ended in a way the policy does not retry (a success, or a failure it does not
    /// cover): the retry before it, if any, succeeded (Envoy's upstream_rq_retry_success).
    pub fn done(&mut self) {
        if self.in_flight.take().is_some() {
            self.cluster.stats.resilience.retry_successes.fetch_add(1, Relaxed);
        }
    }

    /// A try failed in a way the policy retries: Envoy's shouldRetry, counters included.
    pub fn decide(&mut self) -> Decision {
        let counts = &self.cluster.stats.resilience;
        self.in_flight = None;
        if self.retries_left == 0 {
            counts.retry_limit_exceeded.fetch_add(1, Relaxed);
            return Decision::LimitExceeded;
        }
        self.retries_left -= 1;
        let Some(slot) = RetrySlot::acquire(&self.cluster.config.circuit_breakers, &self.cluster.stats) else {
            counts.retry_overflows.fetch_add(1, Relaxed);
            return Decision::Overflow;
        };
        counts.retries.fetch_add(1, Relaxed);
        self.in_flight = Some(slot);
        Decision::Retry(self.backoff())
    }

    /// A retry wanted but impossible: the request body was too long to keep. Envoy stops
    /// retrying such a request altogether once its body outgrows the buffer.
    pub fn give_up(&mut self) {
        self.in_flight = None;
        self.cluster.stats.resilience.retries_skipped_body_too_large.fetch_add(1, Relaxed);
    }

    /// Envoy's fully jittered exponential backoff: uniform below the current interval, which
    /// doubles each time up to the maximum.
    fn backoff(&mut self) -> Duration {
        let interval = self.next_interval;
        let max = self.policy.backoff.max_interval;
        self.next_interval = if interval > max / 2 { max } else { interval * 2 };
        let millis = interval.as_millis().max(1) as u64;
        Duration::from_millis(fastrand::u64(..millis)).min(max)
    }
}

// Parsed once: a lookup by &str parses the name again on every response.
const ENVOY_RATELIMITED: HeaderName = HeaderName::from_static("x-envoy-ratelimited");
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// Whether the policy retries a response with this head (Envoy's wouldRetryFromHeaders).
pub fn retries_response<B>(policy: &RetryPolicy, response: &Response<B>) -> bool {
    let on = policy.retry_on;
    let headers = response.headers();
    let status = response.status();
    let by_status = (on.contains(RetryOn::SERVER_ERROR) && status.is_server_error())
        || (on.contains(RetryOn::GATEWAY_ERROR)
            && matches!(status, StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT))
        || (on.contains(RetryOn::RETRIABLE_4XX) && status == StatusCode::CONFLICT)
        || (on.contains(RetryOn::RETRIABLE_STATUS_CODES) && policy.retriable_status_codes.contains(&status.as_u16()));
    let would = by_status || (on.intersects(RetryOn::GRPC) && grpc_status_retried(on, headers));
    // A response an upstream Envoy rate-limited is retried only for envoy-ratelimited, whatever
    // else would retry it; looked up only when it can change the answer (not on a plain success).
    if (would || on.contains(RetryOn::ENVOY_RATE_LIMITED)) && headers.contains_key(ENVOY_RATELIMITED) {
        return on.contains(RetryOn::ENVOY_RATE_LIMITED);
    }
    would
}

/// The gRPC status of a trailers-only response (Envoy reads it from the response head only).
fn grpc_status_retried(on: RetryOn, headers: &HeaderMap) -> bool {
    let Some(status) = headers.get(GRPC_STATUS).and_then(|v| std::str::from_utf8(v.as_bytes()).ok()?.parse::<u32>().ok())
    else {
        return false;
    };
    match status {
        1 => on.contains(RetryOn::GRPC_CANCELLED),
        4 => on.contains(RetryOn::GRPC_DEADLINE_EXCEEDED),
        8 => on.contains(RetryOn::GRPC_RESOURCE_EXHAUSTED),
        13 => on.contains(RetryOn::GRPC_INTERNAL),
        14 => on.contains(RetryOn::GRPC_UNAVAILABLE),
        _ => false,
    }
}

/// Whether the policy retries a try that failed without a response (Envoy's
/// wouldRetryFromReset).
pub fn retries_failure(policy: &RetryPolicy, error: &UpstreamError) -> bool {
    let on = policy.retry_on;
    if matches!(error, UpstreamError::Overflow) {
        return false;
    }
    // Envoy counts any reset as a 5xx (and as a gateway error): both retry every reset.
    if on.intersects(RetryOn::RESET | RetryOn::SERVER_ERROR | RetryOn::GATEWAY_ERROR) {
        return true;
    }
    // A connection that could not be made sent nothing: the request never started.
    (on.intersects(RetryOn::CONNECT_FAILURE | RetryOn::RESET_BEFORE_REQUEST) && is_connect_failure(error))
        || (on.contains(RetryOn::REFUSED_STREAM) && is_refused_stream(error))
}

/// Whether the policy retries a try its per-try timeout ended: Envoy resets such a try and
/// retries it as a reset (5xx, gateway-error, reset).
pub fn retries_per_try_timeout(policy: &RetryPolicy) -> bool {
    policy.retry_on.intersects(RetryOn::RESET | RetryOn::SERVER_ERROR | RetryOn::GATEWAY_ERROR)
}

/// The connection could not be made (refused, timed out, TLS refused): nothing was sent.
pub fn is_connect_failure(error: &UpstreamError) -> bool {
    matches!(
        error,
        UpstreamError::ConnectFailed(_) | UpstreamError::ConnectTimeout | UpstreamError::Tls(_) | UpstreamError::Handshake(_)
    )
}

/// An HTTP/2 upstream refused the stream (REFUSED_STREAM): it did not process the request.
fn is_refused_stream(error: &UpstreamError) -> bool {
    let UpstreamError::Reset(error) = error else { return false };
    let mut cause = std::error::Error::source(error);
    while let Some(current) = cause {
        if let Some(h2) = current.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        cause = current.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::retry::RetryBackoff;

    fn policy(retry_on: RetryOn, codes: Vec<u16>) -> RetryPolicy {
        RetryPolicy {
            retry_on,
            retriable_status_codes: codes,
            num_retries: 1,
            per_try_timeout: None,
            avoid_previous_hosts: false,
            host_selection_retry_max_attempts: 0,
            backoff: RetryBackoff::default(),
            retriable_request_headers: vec![],
        }
    }

    fn response(status: u16, headers: &[(&'static str, &'static str)]) -> Response<()> {
        let mut response = Response::new(());
        *response.status_mut() = StatusCode::from_u16(status).unwrap();
        for (name, value) in headers {
            response.headers_mut().insert(*name, http::HeaderValue::from_static(value));
        }
        response
    }

    #[test]
    fn responses_are_retried_as_envoy_decides() {
        let p = policy(RetryOn::SERVER_ERROR, vec![]);
        assert!(retries_response(&p, &response(500, &[])));
        assert!(retries_response(&p, &response(503, &[])));
        assert!(!retries_response(&p, &response(409, &[])));
        // An upstream Envoy's rate limiting is retried only when asked for.
        assert!(!retries_response(&p, &response(503, &[("x-envoy-ratelimited", "true")])));
        let gateway = policy(RetryOn::GATEWAY_ERROR, vec![]);
        assert!(!retries_response(&gateway, &response(500, &[])));
        assert!(retries_response(&gateway, &response(504, &[])));
        let codes = policy(RetryOn::RETRIABLE_STATUS_CODES | RetryOn::RETRIABLE_4XX, vec![418]);
        assert!(retries_response(&codes, &response(418, &[])));
        assert!(retries_response(&codes, &response(409, &[])));
        assert!(!retries_response(&codes, &response(500, &[])));
        let grpc = policy(RetryOn::GRPC_UNAVAILABLE, vec![]);
        assert!(retries_response(&grpc, &response(200, &[("grpc-status", "14")])));
        assert!(!retries_response(&grpc, &response(200, &[("grpc-status", "13")])));
        assert!(!retries_response(&grpc, &response(503, &[])));
    }

    #[test]
    fn failures_are_retried_as_envoy_decides() {
        let refused = || UpstreamError::ConnectFailed(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(retries_failure(&policy(RetryOn::CONNECT_FAILURE, vec![]), &refused()));
        assert!(retries_failure(&policy(RetryOn::SERVER_ERROR, vec![]), &refused()));
        assert!(retries_failure(&policy(RetryOn::RESET_BEFORE_REQUEST, vec![]), &UpstreamError::ConnectTimeout));
        assert!(!retries_failure(&policy(RetryOn::RETRIABLE_4XX, vec![]), &refused()));
        assert!(!retries_failure(&policy(RetryOn::RESET, vec![]), &UpstreamError::Overflow));
        assert!(retries_per_try_timeout(&policy(RetryOn::GATEWAY_ERROR, vec![])));
        assert!(!retries_per_try_timeout(&policy(RetryOn::CONNECT_FAILURE, vec![])));
    }
}
