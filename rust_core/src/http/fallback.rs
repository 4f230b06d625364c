//! meshctl's Fallback on the request path: the breaker's verdict before a request is sent, its
//! outcome after, and the degraded answer (a fixed response, or another cluster) in its place.

use std::time::Instant;

use http::header::{HeaderName, HeaderValue};
use http::{Response, StatusCode};

use super::body::ResponseBody;
use super::proxy::address_head;
use super::upstream_request::{self, no_healthy_upstream, Answer, Failed, Upstream};
use crate::model::fallback::{FallbackReason, FallbackTarget};
use crate::upstream::destination_breaker::Admission;
use crate::upstream::fallback::ClusterFallback;

const FALLBACK_HEADER: HeaderName = HeaderName::from_static("x-meshctl-fallback");

/// A request the breaker let through: its outcome is recorded once (a probe that is dropped
/// unrecorded, the client gone, lets the next request probe).
pub struct BreakerCall<'a> {
    fallback: &'a ClusterFallback,
    admission: Admission,
    started: Instant,
    recorded: bool,
}

impl<'a> BreakerCall<'a> {
    pub fn new(fallback: &'a ClusterFallback, admission: Admission) -> Self {
        BreakerCall { fallback, admission, started: Instant::now(), recorded: false }
    }

    pub fn record(mut self, failed: bool) {
        if let Some(breaker) = &self.fallback.breaker {
            breaker.record(self.admission, failed, self.started.elapsed(), Instant::now());
        }
        self.recorded = true;
    }
}

impl Drop for BreakerCall<'_> {
    fn drop(&mut self) {
        if !self.recorded && self.admission == Admission::Probe {
            if let Some(breaker) = &self.fallback.breaker {
                breaker.abandon_probe();
            }
        }
    }
}

/// Why an answer failed, as a Fallback's `on` names it; None for a success (or the client's fault).
pub fn failure_reason(answer: &Answer) -> Option<FallbackReason> {
    match (&answer.result, answer.failed) {
        (Ok((response, _)), _) => response.status().is_server_error().then_some(FallbackReason::ServerError),
        (Err(_), Some(Failed::Timeout)) => Some(FallbackReason::Timeout),
        (Err(_), Some(Failed::Overflow)) => Some(FallbackReason::Overflow),
        (Err(_), Some(Failed::NoHealthyUpstream)) => Some(FallbackReason::NoHealthyUpstream),
        (Err(_), Some(Failed::Reset)) => Some(FallbackReason::ServerError),
        (Err(_), None) => None,
    }
}

/// The fixed answer of a `response` fallback, counted; None for a `destination` one.
pub fn fixed_response(fallback: &ClusterFallback, reason: FallbackReason) -> Option<Response<ResponseBody>> {
    let FallbackTarget::Response { status, headers, body } = &fallback.config.target else { return None };
    fallback.count(reason);
    let mut response = Response::new(ResponseBody::text(body.clone()));
    *response.status_mut() = StatusCode::from_u16(*status).unwrap_or(StatusCode::OK);
    for (name, value) in headers {
        // Checked when decoded.
        if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value)) {
            response.headers_mut().insert(name, value);
        }
    }
    mark(&mut response, reason);
    Some(response)
}

/// The cluster a `destination` fallback sends to.
pub fn target_cluster(fallback: &ClusterFallback) -> Option<&str> {
    match &fallback.config.target {
        FallbackTarget::Cluster(name) => Some(name),
        FallbackTarget::Response { .. } => None,
    }
}

/// Say on the answer that a fallback gave it, and why.
pub fn mark<B>(response: &mut Response<B>, reason: FallbackReason) {
    response.headers_mut().insert(FALLBACK_HEADER, HeaderValue::from_static(reason.as_str()));
}

/// Send a copy of a failed request (one without a body) to the fallback's cluster.
pub async fn send_again(upstream: Upstream<'_>, mut head: http::request::Parts, host: &str) -> Answer {
    let cluster = upstream.cluster;
    let Some(endpoint) = cluster.pick_endpoint(upstream.context.original_destination) else {
        return Answer { result: Err(no_healthy_upstream(cluster, upstream.grpc)), tries: 0, failed: Some(Failed::NoHealthyUpstream) };
    };
    let path = head.uri.path_and_query().cloned().unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    if address_head(&mut head, cluster, host, path).is_err() {
        // The same host and path were fine for the first cluster: unreachable in practice.
        return Answer { result: Err(no_healthy_upstream(cluster, upstream.grpc)), tries: 0, failed: Some(Failed::NoHealthyUpstream) };
    }
    upstream_request::send_parts(upstream, endpoint, head, None).await
}
