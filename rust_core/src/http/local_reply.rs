//! Responses the proxy makes itself (no route, no upstream, timeouts), in HTTP or gRPC form.

use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Response, StatusCode};

use super::body::ResponseBody;
use crate::telemetry::access_log::{LocalReplyCause, ResponseFlags};
use crate::telemetry::resilience::ResponseFlag;

/// A plain-text local reply; for gRPC requests, a trailers-only response carrying the status
/// (gRPC clients read grpc-status, not the HTTP status).
pub fn local_reply(status: StatusCode, message: &str, grpc: bool) -> Response<ResponseBody> {
    if grpc {
        let mut response = Response::new(ResponseBody::empty());
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert("grpc-status", HeaderValue::from(grpc_status(status)));
        if let Ok(value) = HeaderValue::from_str(message) {
            headers.insert("grpc-message", value);
        }
        return response;
    }
    let mut response = Response::new(ResponseBody::text(message.to_string()));
    *response.status_mut() = status;
    if !message.is_empty() {
        response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    response
}

/// A local reply marked with its response flag and Envoy's response code details, which the
/// access log reads (only replies the proxy makes itself carry this: the slow path).
pub fn caused<B>(mut response: Response<B>, flag: Option<ResponseFlag>, details: &'static str) -> Response<B> {
    let mut flags = ResponseFlags::default();
    if let Some(flag) = flag {
        flags.insert(flag);
    }
    response.extensions_mut().insert(LocalReplyCause { flags, details });
    response
}

/// The answer to a request the fault filter aborts: its HTTP status (in gRPC form for a gRPC
/// request, as any local reply), or a trailers-only gRPC response with its gRPC status.
pub fn fault_abort_reply(abort: &crate::model::fault::FaultAbort, grpc: bool) -> Response<ResponseBody> {
    use crate::model::fault::AbortStatus;
    match abort.status {
        AbortStatus::Http(status) => local_reply(status, &abort.body, grpc),
        AbortStatus::Grpc(code) => {
            let mut response = Response::new(ResponseBody::empty());
            let headers = response.headers_mut();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            headers.insert("grpc-status", HeaderValue::from(code));
            if let Ok(value) = HeaderValue::from_str(&abort.body) {
                headers.insert("grpc-message", value);
            }
            response
        }
    }
}

/// The answer to a request the local rate limit filter limits: its status (429 unless configured)
/// and Envoy's body "local_rate_limited", or for gRPC a trailers-only response (RESOURCE_EXHAUSTED
/// when rate_limited_as_resource_exhausted, else the status' gRPC mapping); then the config's
/// response_headers_to_add. No x-envoy-ratelimited: Envoy's docs say the filter sets it, but only
/// the global ratelimit filter does (Envoy 1.40's local replies of this filter do not carry it).
pub fn rate_limited_reply(config: &crate::model::local_ratelimit::LocalRateLimit, grpc: bool) -> Response<ResponseBody> {
    const BODY: &str = "local_rate_limited";
    let mut response = if grpc && config.rate_limited_as_resource_exhausted {
        let mut response = Response::new(ResponseBody::empty());
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert("grpc-status", HeaderValue::from_static("8"));
        headers.insert("grpc-message", HeaderValue::from_static(BODY));
        response
    } else {
        local_reply(config.status, BODY, grpc)
    };
    config.response_headers.apply(response.headers_mut());
    response
}

/// The gRPC status for an HTTP status, as gRPC's HTTP-to-gRPC mapping defines it, except that a
/// proxy timeout is DEADLINE_EXCEEDED.
fn grpc_status(status: StatusCode) -> u16 {
    match status.as_u16() {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 => 14,
        504 => 4,
        _ => 2,
    }
}
