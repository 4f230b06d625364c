//! Sends a routed request to its cluster: one try, or more under a retry policy, each within the
//! per-try and route timeouts; what fails becomes Envoy's local reply and response flags.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::future::Future;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode};
use futures_util::FutureExt;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::Instant;

use super::body::ResponseBody;
use super::local_reply::{caused, local_reply};
use super::proxy::{body_fault_reply, HttpContext};
use super::replay_body::Replay;
use super::request_body::RequestBody;
use super::retry::{is_connect_failure, retries_failure, retries_per_try_timeout, retries_response, Decision, RetryState};
use crate::model::retry::RetryPolicy;
use crate::telemetry::resilience::ResponseFlag;
use crate::upstream::pool::{ConnectionLease, UpstreamError};
use crate::upstream::{ClusterRuntime, Endpoint};

/// Where and how a routed request goes.
pub struct Upstream<'a> {
    pub context: &'a Arc<HttpContext>,
    pub cluster: &'a Arc<ClusterRuntime>,
    /// None: the request is tried once and its body streamed, with nothing kept.
    pub retry_policy: Option<&'a RetryPolicy>,
    pub retry_buffer_limit: usize,
    /// The route's timeout: all tries and backoffs together.
    pub timeout: Option<Duration>,
    pub grpc: bool,
    pub downstream_http1: bool,
    /// Send x-envoy-attempt-count with each try.
    pub attempt_count_header: bool,
    /// Keeps the first try's body for a mirror's copy (None unless the route mirrors it).
    pub mirror_body: Option<Box<super::request_body::BodyTee>>,
}

/// The upstream's response (with the lease on its connection), or the local reply that
/// replaces it, and how many tries were made.
pub struct Answer {
    pub result: Result<(Response<Incoming>, Option<ConnectionLease>), Response<ResponseBody>>,
    pub tries: u32,
    /// Why the local reply replaced a response (None for the client's own fault, or a response).
    pub failed: Option<Failed>,
}

/// What the upstream side did wrong when the answer is a local reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failed {
    /// The route's or the last try's timeout (504, UT).
    Timeout,
    /// A circuit breaker refused it (503, UO).
    Overflow,
    /// No endpoint was left to retry on (503, UH).
    NoHealthyUpstream,
    /// The connection failed or was reset (503, UF / UR).
    Reset,
}

impl Answer {
    fn local(reply: Response<ResponseBody>, tries: u32, failed: Option<Failed>) -> Self {
        Answer { result: Err(reply), tries, failed }
    }
}

/// A try that did not produce a response to pass on.
enum Failure {
    /// A response the retry policy covers.
    Response(Response<Incoming>, Option<ConnectionLease>),
    Error(UpstreamError),
    PerTryTimeout,
}

/// Whatever of a retried response's body is left is read (up to this, within a second), so its
/// HTTP/1.1 connection can serve again; a longer or slower one is closed.
const DRAIN_LIMIT: usize = 64 * 1024;
const DRAIN_TIME: Duration = Duration::from_secs(1);

// The request futures below are written as `async move` blocks returned by plain functions, not
// as `async fn`s: an `async fn` keeps a second copy of every argument in its future, and these
// futures are nested in (and moved with) every request's, so their size is the hot path's cost.

pub fn send<'a>(upstream: Upstream<'a>, first_endpoint: Arc<Endpoint>, request: Request<Incoming>) -> impl Future<Output = Answer> + 'a {
    let (parts, incoming) = request.into_parts();
    send_parts(upstream, first_endpoint, parts, Some(incoming))
}

/// `send` for a request head with its body (None: no body, e.g. a fallback's copy of a GET).
pub fn send_parts<'a>(
    upstream: Upstream<'a>,
    first_endpoint: Arc<Endpoint>,
    parts: http::request::Parts,
    incoming: Option<Incoming>,
) -> impl Future<Output = Answer> + 'a {
    let Upstream { context, cluster, grpc, mut mirror_body, .. } = upstream;
    let deadline = upstream.timeout.map(|timeout| Instant::now() + timeout);
    let mut state = upstream.retry_policy.map(|policy| RetryState::new(policy, cluster));
    // Only a request that may be retried keeps its body; the others stream it through.
    let (mut incoming, replay) = match (&state, incoming) {
        (Some(_), Some(incoming)) if !http_body::Body::is_end_stream(&incoming) => {
            (None, Some(Replay::new(incoming, upstream.retry_buffer_limit)))
        }
        (Some(_), _) => (None, None),
        (None, incoming) => (incoming, None),
    };
    let (attempt_count_header, downstream_http1) = (upstream.attempt_count_header, upstream.downstream_http1);
    let request_messages = parts.extensions.get::<super::istio_stats::GrpcRequestMessages>().cloned();
    let mut parts = Some(parts);
    async move {
        let mut endpoint = first_endpoint;
        let mut tries: u32 = 1;
        loop {
            let body = match (&replay, incoming.take()) {
                // The first try's gRPC messages are the request's; a retry's are not counted again.
                (Some(replay), _) => {
                    RequestBody::replay(replay.body_for_try(tries), context.clone()).counting(request_messages.clone().filter(|_| tries == 1))
                }
                (None, Some(incoming)) => RequestBody::new(incoming, context.clone()).counting(request_messages.clone()),
                (None, None) => RequestBody::empty(context.clone()),
            };
            let body = match mirror_body.take() {
                Some(tee) => body.with_tee(tee),
                None => body,
            };
            let head = head_for_try(&mut parts, state.is_some(), attempt_count_header.then_some(tries));
            if let Some(state) = &mut state {
                state.tried(endpoint.address);
            }
            cluster.stats.requests_total.fetch_add(1, Relaxed);
            let active = endpoint.start_request();
            let started = std::time::Instant::now();
            let faults_mark = context.body_faults.mark();
            let per_try_deadline = state.as_ref().and_then(|s| s.policy().per_try_timeout).map(|t| Instant::now() + t);
            let sent = endpoint.send(Request::from_parts(head, body));
            let outcome = match earliest(deadline, per_try_deadline) {
                Some(at) => match tokio::time::timeout_at(at, sent).await {
                    Ok(result) => Some(result),
                    Err(_) if per_try_deadline.is_some_and(|p| deadline.is_none_or(|d| p < d)) => None,
                    Err(_) => {
                        endpoint.record_timeout();
                        abandon(&replay);
                        return Answer::local(timeout_reply(cluster, grpc), tries, Some(Failed::Timeout));
                    }
                },
                None => Some(sent.await),
            };
            drop(active);
            let failure = match outcome {
                Some(Ok((response, lease))) => {
                    if !state.as_ref().is_some_and(|s| retries_response(s.policy(), &response)) {
                        if let Some(state) = &mut state {
                            state.done();
                        }
                        commit(&replay);
                        return Answer { result: Ok(passed_on(cluster, response, lease, started)), tries, failed: None };
                    }
                    Failure::Response(response, lease)
                }
                Some(Err(error)) => {
                    if let Some(fault) = context.body_faults.since(faults_mark) {
                        // The client broke its own request body and the exchange failed because of
                        // it: the client's error, not the cluster's, and nothing to retry.
                        return Answer::local(body_fault_reply(fault, grpc, downstream_http1), tries, None);
                    }
                    endpoint.record_failure(&error);
                    Failure::Error(error)
                }
                None => {
                    cluster.stats.resilience.per_try_timeouts.fetch_add(1, Relaxed);
                    endpoint.record_timeout();
                    Failure::PerTryTimeout
                }
            };
            let decision = match &mut state {
                Some(state) if retried(state.policy(), &failure) => {
                    if replay.as_ref().is_some_and(|r| !r.replayable()) {
                        state.give_up();
                        None
                    } else {
                        Some(state.decide())
                    }
                }
                Some(state) => {
                    state.done();
                    None
                }
                None => None,
            };
            let backoff = match decision {
                Some(Decision::Retry(backoff)) => backoff,
                refused => {
                    let flag = match refused {
                        Some(Decision::LimitExceeded) => Some(ResponseFlag::UpstreamRetryLimitExceeded),
                        Some(Decision::Overflow) => Some(ResponseFlag::UpstreamOverflow),
                        _ => None,
                    };
                    // A response passed on may still be receiving the request body (a stream): the
                    // try goes on; any other failure ends it.
                    if matches!(failure, Failure::Response(..)) {
                        commit(&replay);
                    } else {
                        abandon(&replay);
                    }
                    let failed = failed_as(&failure);
                    return Answer { result: final_failure(cluster, failure, flag, tries, grpc, started), tries, failed };
                }
            };
            // Nothing reads the downstream body while the next try is not under way.
            abandon(&replay);
            if let Failure::Response(response, lease) = failure {
                discard(response, lease);
            }
            let wake = Instant::now() + backoff;
            if let Some(deadline) = deadline.filter(|d| *d <= wake) {
                tokio::time::sleep_until(deadline).await;
                return Answer::local(timeout_reply(cluster, grpc), tries, Some(Failed::Timeout));
            }
            tokio::time::sleep_until(wake).await;
            endpoint = match pick_for_retry(cluster, context, state.as_ref().expect("retrying")) {
                Some(next) => next,
                None => return Answer::local(no_healthy_upstream(cluster, grpc), tries, Some(Failed::NoHealthyUpstream)),
            };
            tries += 1;
        }
    }
}

/// The head of the next try, with x-envoy-attempt-count when the virtual host asks for it. A
/// request that may be retried keeps a copy for the next try; the first try sends the original,
/// whose header map hyper then reuses (cleared, its capacity kept) to read the response into: a
/// copy's map is allocated to its exact length and would be grown again for the response.
fn head_for_try(parts: &mut Option<http::request::Parts>, may_retry: bool, attempt_count: Option<u32>) -> http::request::Parts {
    let mut head = parts.take().expect("kept for every try");
    if may_retry {
        *parts = Some(head.clone());
    }
    if let Some(tries) = attempt_count {
        head.headers.insert(HeaderName::from_static("x-envoy-attempt-count"), HeaderValue::from(tries));
    }
    head
}

/// The try under way is given up: its request body fails, so its exchange (a connection
/// task still sending it) is reset rather than left streaming the downstream body.
fn abandon(replay: &Option<Replay>) {
    if let Some(replay) = replay {
        replay.supersede();
    }
}

/// The response of the try under way is passed on: nothing more needs keeping for a retry.
fn commit(replay: &Option<Replay>) {
    if let Some(replay) = replay {
        replay.commit();
    }
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// What a final failure becomes a local reply for; None when its response is passed on.
fn failed_as(failure: &Failure) -> Option<Failed> {
    match failure {
        Failure::Response(..) => None,
        Failure::PerTryTimeout => Some(Failed::Timeout),
        Failure::Error(UpstreamError::Overflow) => Some(Failed::Overflow),
        Failure::Error(_) => Some(Failed::Reset),
    }
}

fn retried(policy: &RetryPolicy, failure: &Failure) -> bool {
    match failure {
        // Already known to be covered.
        Failure::Response(..) => true,
        Failure::Error(error) => retries_failure(policy, error),
        Failure::PerTryTimeout => retries_per_try_timeout(policy),
    }
}

/// The next endpoint for a retry: up to the policy's picks to find one it does not avoid, else
/// the last one picked (Envoy's host selection with retry host predicates).
fn pick_for_retry(cluster: &ClusterRuntime, context: &HttpContext, state: &RetryState<'_>) -> Option<Arc<Endpoint>> {
    let mut last = None;
    for _ in 0..state.host_selection_attempts() {
        let picked = cluster.pick_endpoint(context.original_destination)?;
        if !state.avoids(picked.address) {
            return Some(picked);
        }
        last = Some(picked);
    }
    last
}

fn passed_on(
    cluster: &ClusterRuntime,
    response: Response<Incoming>,
    lease: Option<ConnectionLease>,
    started: std::time::Instant,
) -> (Response<Incoming>, Option<ConnectionLease>) {
    cluster.stats.latency.record(started.elapsed());
    cluster.stats.responses.record(response.status().as_u16());
    (response, lease)
}

/// The last try failed and is not retried: its response, or Envoy's local reply for it.
#[allow(clippy::result_large_err)] // built once per failed request, moved once
fn final_failure(
    cluster: &ClusterRuntime,
    failure: Failure,
    retry_flag: Option<ResponseFlag>,
    tries: u32,
    grpc: bool,
    started: std::time::Instant,
) -> Result<(Response<Incoming>, Option<ConnectionLease>), Response<ResponseBody>> {
    let flags = &cluster.stats.resilience.response_flags;
    if let Some(flag) = retry_flag {
        flags.record(flag);
    }
    match failure {
        Failure::Response(response, lease) => {
            let response = match retry_flag {
                Some(flag) => caused(response, Some(flag), "via_upstream"),
                None => response,
            };
            Ok(passed_on(cluster, response, lease, started))
        }
        Failure::PerTryTimeout => Err(timeout_reply(cluster, grpc)),
        Failure::Error(error) => {
            let (flag, details) = match &error {
                UpstreamError::Overflow => (ResponseFlag::UpstreamOverflow, "upstream_reset_before_response_started{overflow}"),
                e if is_connect_failure(e) => (ResponseFlag::UpstreamConnectionFailure, "upstream_reset_before_response_started{connection_failure}"),
                _ => (ResponseFlag::UpstreamRemoteReset, "upstream_reset_before_response_started{remote_reset}"),
            };
            flags.record(flag);
            cluster.stats.responses.record(503);
            // Envoy's wording, which says when the request was retried.
            let retried = if tries > 1 { "retried and the latest reset reason" } else { "reset reason" };
            let message = format!("upstream connect error or disconnect/reset before headers. {retried}: {error}");
            let mut reply = caused(local_reply(StatusCode::SERVICE_UNAVAILABLE, &message, grpc), Some(flag), details);
            if let Some(retry_flag) = retry_flag {
                reply.extensions_mut().get_mut::<crate::telemetry::access_log::LocalReplyCause>().expect("just set").flags.insert(retry_flag);
            }
            Err(reply)
        }
    }
}

/// 504, flag UT: the route's timeout, or the last try's per-try timeout.
fn timeout_reply(cluster: &ClusterRuntime, grpc: bool) -> Response<ResponseBody> {
    cluster.stats.responses.record(504);
    cluster.stats.resilience.response_flags.record(ResponseFlag::UpstreamRequestTimeout);
    caused(local_reply(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout", grpc), Some(ResponseFlag::UpstreamRequestTimeout), "upstream_response_timeout")
}

/// 503, flag UH: no endpoint can take the request.
pub fn no_healthy_upstream(cluster: &ClusterRuntime, grpc: bool) -> Response<ResponseBody> {
    // Counted as the cluster's 503 like a connect failure, so error rates see an empty cluster.
    cluster.stats.requests_total.fetch_add(1, Relaxed);
    cluster.stats.responses.record(503);
    cluster.stats.resilience.response_flags.record(ResponseFlag::NoHealthyUpstream);
    // Envoy says "no healthy upstream"; meshctl also names the cluster.
    let reply = local_reply(StatusCode::SERVICE_UNAVAILABLE, &format!("no healthy upstream in cluster {:?}", cluster.config.name), grpc);
    caused(reply, Some(ResponseFlag::NoHealthyUpstream), "no_healthy_upstream")
}

/// Let go of a response that is being retried. Envoy resets its stream; an HTTP/2 stream is
/// reset here too (its body dropped), but the rest of a short HTTP/1.1 body is read so that
/// the connection can serve again rather than close.
fn discard(response: Response<Incoming>, lease: Option<ConnectionLease>) {
    let http1 = lease.as_ref().is_some_and(ConnectionLease::is_http1);
    let mut body = ResponseBody::Upstream(response.into_body(), lease);
    if !http1 || http_body::Body::is_end_stream(&body) {
        return;
    }
    // Usually the rest came with the head: read now, the connection is back before the next try.
    let mut read = 0;
    loop {
        match body.frame().now_or_never() {
            Some(Some(Ok(frame))) => {
                read += frame.data_ref().map_or(0, |data| data.len());
                if read > DRAIN_LIMIT {
                    return;
                }
            }
            Some(_) => return,
            None => break,
        }
    }
    tokio::spawn(drain(body, read));
}

async fn drain(mut body: ResponseBody, mut read: usize) {
    let read_to_end = async {
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { return };
            read += frame.data_ref().map_or(0, |data| data.len());
            if read > DRAIN_LIMIT {
                return;
            }
        }
    };
    // At its end the body returns its connection to the pool; cut short, it closes it.
    let _ = tokio::time::timeout(DRAIN_TIME, read_to_end).await;
}

/// The retry controls Envoy reads from a request and never forwards. meshctl does not honour
/// them (Envoy does, from clients it trusts): they are removed, so no upstream sees them either.
pub fn strip_retry_headers(headers: &mut HeaderMap) {
    const NAMES: [&str; 7] = [
        "x-envoy-retry-on",
        "x-envoy-retry-grpc-on",
        "x-envoy-max-retries",
        "x-envoy-retriable-status-codes",
        "x-envoy-retriable-header-names",
        "x-envoy-hedge-on-per-try-timeout",
        "x-envoy-upstream-rq-per-try-timeout-ms",
    ];
    // One pass over the names; the lookups happen only for requests that carry x-envoy- headers.
    if headers.keys().any(|name| name.as_str().starts_with("x-envoy-")) {
        for name in NAMES {
            headers.remove(name);
        }
    }
}
