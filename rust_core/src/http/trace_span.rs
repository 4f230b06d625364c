//! The request path's side of tracing: on arrival, the caller's trace context is read, the span
//! is decided (sampled or not) and its context written into the request sent onward; the span is
//! finished when the response body ends (or is dropped) and handed to the exporter.

use std::borrow::Cow;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName};
use http::{Request, Response, Version};
use http_body::{Body, Frame};
use hyper::body::Incoming;

use super::body::ResponseBody;
use super::proxy::HttpContext;
use crate::model::tracing::{CustomTagValue, SpanKind, TracingConfig};
use crate::telemetry::access_log::{LocalReplyCause, UpstreamInfo};
use crate::telemetry::resilience::ResponseFlag;
use crate::telemetry::sampling;
use crate::telemetry::span::{truncated, FinishedSpan, MAX_TAG_VALUE_LENGTH};
use crate::telemetry::trace_context::{extract, inject, new_span_id, new_trace_id, Extracted, SpanContext};

/// The route's decorator operation: the span's name (in the response's extensions, only when
/// the connection manager traces).
#[derive(Debug, Clone)]
pub struct SpanOperation(pub Arc<str>);

/// A sampled request's span, until its response ends.
pub struct ActiveSpan {
    config: Arc<TracingConfig>,
    context: SpanContext,
    start: SystemTime,
    started: Instant,
    /// Envoy's default name when the route has no decorator: "ingress", or "egress <host>".
    default_name: String,
    tags: Vec<(Cow<'static, str>, String)>,
}

/// Reads the caller's context, decides, and sends this span's context onward (also when it is
/// not sampled, so the rest of the trace knows the decision). Some only for a sampled request.
pub fn begin(context: &HttpContext, config: &Arc<TracingConfig>, request: &mut Request<Incoming>) -> Option<Box<ActiveSpan>> {
    let (parent, caller_decision) = match extract(request.headers()) {
        Extracted::Parent(parent) => {
            let decision = parent.sampled;
            (Some(parent), decision)
        }
        Extracted::DecisionOnly(sampled) => (None, Some(sampled)),
        Extracted::None => (None, None),
    };
    let sampled = sampling::decide(caller_decision, config.random_sampling_percent);
    let (trace_id, parent_span_id, tracestate) = match parent {
        Some(parent) => (parent.trace_id, Some(parent.span_id), parent.tracestate),
        None => (new_trace_id(), None, None),
    };
    let span = SpanContext { trace_id, span_id: new_span_id(), parent_span_id, sampled, tracestate };
    inject(&span, request.headers_mut());
    if !sampled {
        return None;
    }
    // As Envoy's connection manager: the request has an x-request-id before anything reads it,
    // so the span's guid:x-request-id is the one the upstream and the access log see.
    const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
    if !request.headers().contains_key(REQUEST_ID) {
        request.headers_mut().insert(REQUEST_ID, super::proxy::request_id());
    }
    let headers = request.headers();
    let text = |name: &HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    let host = request
        .uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| text(&header::HOST))
        .unwrap_or("");
    let scheme = text(&HeaderName::from_static("x-forwarded-proto")).unwrap_or(context.scheme);
    let path = text(&HeaderName::from_static("x-envoy-original-path"))
        .or_else(|| request.uri().path_and_query().map(|p| p.as_str()))
        .unwrap_or("/");
    let url = truncated(format!("{scheme}://{host}{path}"), config.max_path_tag_length);
    let default_name = match config.kind {
        SpanKind::Server => "ingress".to_string(),
        SpanKind::Client => truncated(format!("egress {host}"), MAX_TAG_VALUE_LENGTH),
    };
    let mut tags: Vec<(Cow<'static, str>, String)> = Vec::with_capacity(16 + config.custom_tags.len());
    tags.push(("component".into(), "proxy".into()));
    tags.push(("http.method".into(), request.method().as_str().to_string()));
    tags.push(("http.url".into(), url));
    tags.push(("http.protocol".into(), protocol(request.version()).into()));
    tags.push(("peer.address".into(), context.peer.ip().to_string()));
    tags.push(("guid:x-request-id".into(), capped(text(&REQUEST_ID).unwrap_or(""))));
    tags.push(("user_agent".into(), capped(text(&header::USER_AGENT).unwrap_or("-"))));
    custom_tags(config, headers, &mut tags);
    Some(Box::new(ActiveSpan {
        config: config.clone(),
        context: span,
        start: SystemTime::now(),
        started: Instant::now(),
        default_name,
        tags,
    }))
}

fn capped(value: &str) -> String {
    truncated(value.to_string(), MAX_TAG_VALUE_LENGTH)
}

fn protocol(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}

fn custom_tags(config: &TracingConfig, headers: &HeaderMap, tags: &mut Vec<(Cow<'static, str>, String)>) {
    for custom in &config.custom_tags {
        let value = match &custom.value {
            CustomTagValue::Literal { value } => value.clone(),
            CustomTagValue::RequestHeader { name, default_value } => {
                match headers.get(name).and_then(|v| v.to_str().ok()) {
                    Some(found) => capped(found),
                    None if !default_value.is_empty() => default_value.clone(),
                    None => continue,
                }
            }
        };
        // A custom tag of the same name replaces Envoy's own, as in Envoy (set last wins).
        tags.retain(|(tag, _)| tag != custom.tag.as_str());
        tags.push((Cow::Owned(custom.tag.clone()), value));
    }
}

/// Adds the response's tags and wraps the body so the span ends when the body does.
pub fn finish_at_body_end(context: &Arc<HttpContext>, mut span: Box<ActiveSpan>, response: Response<ResponseBody>) -> Response<ResponseBody> {
    let status = response.status().as_u16();
    let extensions = response.extensions();
    if let Some(SpanOperation(operation)) = extensions.get::<SpanOperation>() {
        span.default_name = operation.to_string();
    }
    let flags = match extensions.get::<LocalReplyCause>() {
        Some(cause) => flags_text(cause),
        None => "-".to_string(),
    };
    let cluster = extensions.get::<UpstreamInfo>().map_or_else(|| "-".to_string(), |upstream| upstream.cluster.clone());
    span.tags.push(("http.status_code".into(), status.to_string()));
    span.tags.push(("response_flags".into(), flags));
    span.tags.push(("upstream_cluster".into(), cluster.clone()));
    span.tags.push(("upstream_cluster.name".into(), cluster));
    let (parts, body) = response.into_parts();
    let body = ResponseBody::Traced(Box::new(TracedBody { inner: body, span: Some(span), status, context: context.clone() }));
    Response::from_parts(parts, body)
}

fn flags_text(cause: &LocalReplyCause) -> String {
    let names: Vec<&str> = ResponseFlag::ALL.iter().filter(|flag| cause.flags.contains(**flag)).map(|flag| flag.short_name()).collect();
    if names.is_empty() {
        "-".to_string()
    } else {
        names.join(",")
    }
}

/// A response body that ends its request's span when it ends, fails or is dropped.
pub struct TracedBody {
    inner: ResponseBody,
    span: Option<Box<ActiveSpan>>,
    status: u16,
    context: Arc<HttpContext>,
}

impl TracedBody {
    pub(super) fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.finish(false),
            Poll::Ready(Some(Err(_))) => self.finish(true),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.finish(false),
            _ => {}
        }
        polled
    }

    pub(super) fn inner(&self) -> &ResponseBody {
        &self.inner
    }

    fn finish(&mut self, failed: bool) {
        let Some(span) = self.span.take() else { return };
        let ActiveSpan { config, context, start, started, default_name, mut tags } = *span;
        let error = failed || self.status >= 500;
        if error {
            tags.push(("error".into(), "true".into()));
        }
        let finished = FinishedSpan {
            trace_id: context.trace_id,
            span_id: context.span_id,
            parent_span_id: context.parent_span_id,
            tracestate: context.tracestate.and_then(|v| v.to_str().ok().map(str::to_string)),
            name: default_name,
            kind: config.kind,
            start,
            duration: started.elapsed(),
            tags,
            error,
        };
        config.exporter.submit(&self.context, finished);
    }
}

impl Drop for TracedBody {
    fn drop(&mut self) {
        // Dropped before its end: the client went away mid-body (an empty body never polled
        // ends here too, complete).
        let complete = self.inner.is_end_stream();
        self.finish(!complete);
    }
}
