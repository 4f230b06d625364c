//! One unary gRPC call to a cluster of the engine (an HTTP/2 POST carrying one length-prefixed
//! protobuf message; the answer's message and grpc-status trailer), for services the proxy itself
//! asks, such as a rate limit service. Sent through the cluster's own pools and endpoints.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE, TE};
use http::uri::{Authority, PathAndQuery};
use http::{Method, Request, StatusCode, Version};
use http_body_util::BodyExt;

use super::proxy::{upstream_uri, HttpContext};
use super::request_body::{CopiedBody, RequestBody};
use crate::model::UpstreamProtocol;
use crate::upstream::pool::UpstreamError;

/// gRPC messages above this are refused (gRPC's default receive limit).
const MAX_MESSAGE: usize = 4 * 1024 * 1024;

#[derive(Debug)]
pub enum CallError {
    UnknownCluster(String),
    NoHealthyEndpoint,
    Upstream(UpstreamError),
    /// The answer's HTTP status was not 200.
    HttpStatus(StatusCode),
    /// A gRPC status other than OK (0), with its message.
    Status(u32, String),
    Malformed(&'static str),
    Body(String),
    Timeout,
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallError::UnknownCluster(name) => write!(f, "cluster {name:?} is not configured"),
            CallError::NoHealthyEndpoint => write!(f, "no healthy endpoint"),
            CallError::Upstream(e) => write!(f, "{e}"),
            CallError::HttpStatus(s) => write!(f, "HTTP status {s}"),
            CallError::Status(code, message) => write!(f, "grpc-status {code}: {message}"),
            CallError::Malformed(why) => write!(f, "malformed gRPC answer: {why}"),
            CallError::Body(e) => write!(f, "answer body failed: {e}"),
            CallError::Timeout => write!(f, "timed out"),
        }
    }
}

/// gRPC's length-prefixed message: a zero compression flag, the length (big-endian u32), the bytes.
pub fn frame(message: &impl prost::Message) -> Bytes {
    let len = message.encoded_len();
    let mut out = BytesMut::with_capacity(5 + len);
    out.put_u8(0);
    out.put_u32(len as u32);
    message.encode(&mut out).expect("capacity reserved");
    out.freeze()
}

/// The one uncompressed message a unary answer's body carries.
pub fn unframe(body: &[u8]) -> Result<&[u8], CallError> {
    if body.len() < 5 {
        return Err(CallError::Malformed("no complete message"));
    }
    if body[0] != 0 {
        return Err(CallError::Malformed("compressed message (none was asked for)"));
    }
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    if len > MAX_MESSAGE {
        return Err(CallError::Malformed("message too large"));
    }
    match body.len() - 5 {
        n if n < len => Err(CallError::Malformed("message cut short")),
        n if n > len => Err(CallError::Malformed("more than one message")),
        _ => Ok(&body[5..]),
    }
}

/// gRPC's grpc-timeout for `d`, in milliseconds (at most 8 digits, as the spec allows).
fn grpc_timeout(d: Duration) -> HeaderValue {
    let millis = d.as_millis().clamp(1, 99_999_999);
    HeaderValue::from_str(&format!("{millis}m")).expect("digits")
}

/// Where a call goes: the cluster, and the :authority to send.
pub struct Target<'a> {
    pub cluster: &'a str,
    pub authority: &'a Authority,
    pub path: &'static str,
}

/// Calls `target` with `message` (already framed) and `metadata`, within `timeout` (connecting
/// included): the answer's message bytes, or why there is none. `connection`: the downstream
/// connection the call is made for (its request bodies' bookkeeping).
pub async fn call(
    connection: &Arc<HttpContext>,
    target: Target<'_>,
    metadata: &[(HeaderName, HeaderValue)],
    message: Bytes,
    timeout: Duration,
) -> Result<Bytes, CallError> {
    match tokio::time::timeout(timeout, exchange(connection, target, metadata, message, timeout)).await {
        Ok(result) => result,
        Err(_) => Err(CallError::Timeout),
    }
}

async fn exchange(
    connection: &Arc<HttpContext>,
    Target { cluster: cluster_name, authority, path }: Target<'_>,
    metadata: &[(HeaderName, HeaderValue)],
    message: Bytes,
    timeout: Duration,
) -> Result<Bytes, CallError> {
    let cluster = connection.registry.cluster(cluster_name).ok_or_else(|| CallError::UnknownCluster(cluster_name.to_string()))?;
    let endpoint = cluster.pick_endpoint(None).ok_or(CallError::NoHealthyEndpoint)?;
    let http2 = cluster.config.protocol == UpstreamProtocol::Http2;
    let uri = upstream_uri(authority.as_str(), PathAndQuery::from_static(path), http2, cluster.config.tls.is_some())
        .ok_or(CallError::Malformed("not a valid authority"))?;
    let mut request = Request::new(RequestBody::copied(CopiedBody::whole(message), connection.clone()));
    *request.method_mut() = Method::POST;
    *request.uri_mut() = uri;
    *request.version_mut() = if http2 { Version::HTTP_2 } else { Version::HTTP_11 };
    let headers = request.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert(TE, HeaderValue::from_static("trailers"));
    headers.insert("grpc-timeout", grpc_timeout(timeout));
    if !http2 {
        if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
            headers.insert(http::header::HOST, host);
        }
    }
    for (name, value) in metadata {
        headers.insert(name.clone(), value.clone());
    }
    let _active = endpoint.start_request();
    let (response, lease) = match endpoint.send(request).await {
        Ok(answer) => answer,
        Err(e) => {
            endpoint.record_failure(&e);
            return Err(CallError::Upstream(e));
        }
    };
    if response.status() != StatusCode::OK {
        return Err(CallError::HttpStatus(response.status()));
    }
    let (head, body) = response.into_parts();
    // Trailers-only: the status is in the head and there is no message.
    if let Some(status) = head.headers.get("grpc-status") {
        return Err(grpc_error(status, head.headers.get("grpc-message")).unwrap_or(CallError::Malformed("trailers-only OK")));
    }
    let collected = body.collect().await.map_err(|e| CallError::Body(e.to_string()))?;
    drop(lease);
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let status = trailers.get("grpc-status").ok_or(CallError::Malformed("no grpc-status"))?;
    if let Some(error) = grpc_error(status, trailers.get("grpc-message")) {
        return Err(error);
    }
    let bytes = collected.to_bytes();
    let message = unframe(&bytes)?;
    Ok(bytes.slice_ref(message))
}

/// None for OK (0); the error for any other (or unreadable) grpc-status.
fn grpc_error(status: &HeaderValue, message: Option<&HeaderValue>) -> Option<CallError> {
    let code = std::str::from_utf8(status.as_bytes()).ok().and_then(|s| s.trim().parse::<u32>().ok());
    match code {
        Some(0) => None,
        Some(code) => Some(CallError::Status(code, message.map(|m| String::from_utf8_lossy(m.as_bytes()).into_owned()).unwrap_or_default())),
        None => Some(CallError::Malformed("unreadable grpc-status")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
    use prost::Message;

    #[test]
    fn a_framed_message_unframes_to_itself() {
        let request = RateLimitRequest { domain: "d".into(), ..Default::default() };
        let framed = frame(&request);
        assert_eq!(&framed[..5], &[0, 0, 0, 0, request.encoded_len() as u8]);
        let inner = unframe(&framed).unwrap();
        assert_eq!(RateLimitRequest::decode(inner).unwrap(), request);
        // An empty message is five bytes: flag and a zero length.
        assert_eq!(unframe(&frame(&RateLimitRequest::default())).unwrap(), b"");
    }

    #[test]
    fn bad_frames_are_refused() {
        let framed = frame(&RateLimitRequest { domain: "domain".into(), ..Default::default() });
        assert!(matches!(unframe(&framed[..3]), Err(CallError::Malformed(_))));
        assert!(matches!(unframe(&framed[..framed.len() - 1]), Err(CallError::Malformed("message cut short"))));
        let mut two = framed.to_vec();
        two.extend_from_slice(&framed);
        assert!(matches!(unframe(&two), Err(CallError::Malformed("more than one message"))));
        let mut compressed = framed.to_vec();
        compressed[0] = 1;
        assert!(matches!(unframe(&compressed), Err(CallError::Malformed(_))));
        assert!(matches!(unframe(&[0, 0xff, 0xff, 0xff, 0xff]), Err(CallError::Malformed("message too large"))));
    }

    #[test]
    fn grpc_timeout_is_in_milliseconds() {
        assert_eq!(grpc_timeout(Duration::from_millis(20)), "20m");
        assert_eq!(grpc_timeout(Duration::from_micros(10)), "1m");
        assert!(grpc_error(&HeaderValue::from_static("0"), None).is_none());
        assert!(matches!(grpc_error(&HeaderValue::from_static("14"), None), Some(CallError::Status(14, _))));
    }
}
