//! The request path's side of access logs: a request's record is begun when it arrives and
//! logged when its response body ends (or is dropped), from the connection's own task.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{Request, Response};
use http_body::{Body, Frame};
use hyper::body::Incoming;

use super::body::ResponseBody;
use super::proxy::HttpContext;
use crate::model::HttpSettings;
use crate::telemetry::access_log::{LocalReplyCause, RequestRecord, ResponseRecord, UpstreamInfo};

/// The name of the route a request took (in the response's extensions, only when logging).
#[derive(Debug, Clone)]
pub struct RouteName(pub String);

/// What the request brings to its log line, taken before it is routed (and rewritten). Like
/// Envoy's connection manager, it gives the request an x-request-id first if it has none, so the
/// line and the upstream see the same one.
pub fn begin(context: &HttpContext, request: &mut Request<Incoming>) -> Box<RequestRecord> {
    const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
    if !request.headers().contains_key(REQUEST_ID) {
        request.headers_mut().insert(REQUEST_ID, super::proxy::request_id());
    }
    let authority = request
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| request.headers().get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_string));
    // The body is streamed to the upstream out of sight; its declared length is what is known.
    let bytes_received = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Box::new(RequestRecord {
        start_time: SystemTime::now(),
        started: Instant::now(),
        method: request.method().clone(),
        path: request.uri().path_and_query().map_or_else(|| "/".to_string(), |p| p.as_str().to_string()),
        authority,
        scheme: context.scheme,
        version: request.version(),
        request_headers: request.headers().clone(),
        downstream_remote: context.peer,
        requested_server_name: context.requested_server_name.clone(),
        response: ResponseRecord { bytes_received, ..Default::default() },
    })
}

/// Completes the record with the response head and wraps the body, so that the line is written
/// with the bytes sent and the duration once the body has gone out.
pub fn finish_at_body_end(context: &HttpContext, mut record: Box<RequestRecord>, response: Response<ResponseBody>) -> Response<ResponseBody> {
    let (mut parts, body) = response.into_parts();
    let logged = &mut record.response;
    logged.status = parts.status.as_u16();
    logged.headers = parts.headers.clone();
    let upstream = parts.extensions.remove::<UpstreamInfo>();
    match parts.extensions.remove::<LocalReplyCause>() {
        Some(cause) => {
            logged.flags = cause.flags;
            logged.details = cause.details;
        }
        None if upstream.is_some() => logged.details = "via_upstream",
        None => {}
    }
    if let Some(upstream) = upstream {
        logged.upstream_cluster = Some(upstream.cluster);
        logged.upstream_host = Some(upstream.host);
    }
    if let Some(RouteName(name)) = parts.extensions.remove::<RouteName>() {
        logged.route_name = Some(name);
    }
    let body = ResponseBody::Logged(Box::new(LoggedBody { inner: body, record, settings: context.settings.clone() }));
    Response::from_parts(parts, body)
}

/// A response body that counts what it sends and logs the request when it ends or is dropped
/// (a client gone mid-body is logged too, with what was sent).
pub struct LoggedBody {
    inner: ResponseBody,
    record: Box<RequestRecord>,
    settings: Arc<HttpSettings>,
}

impl LoggedBody {
    pub(super) fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.record.response.bytes_sent += data.len() as u64;
            }
        }
        polled
    }

    pub(super) fn inner(&self) -> &ResponseBody {
        &self.inner
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        self.record.response.duration = self.record.started.elapsed();
        for log in &self.settings.access_log {
            log.log(&self.record);
        }
    }
}
