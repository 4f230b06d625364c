//! The request path's side of Istio's standard metrics: the peer is resolved when a request
//! arrives (once per connection for an inbound peer), and its series updated when the response
//! body ends, with the bytes, gRPC messages and status that went out.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response};
use http_body::{Body, Frame};
use hyper::body::Incoming;

use super::body::ResponseBody;
use super::proxy::HttpContext;
use crate::model::workload::{IstioStatsConfig, Reporter, ServiceMetadata, WorkloadMetadata};
use crate::telemetry::access_log::LocalReplyCause;
use crate::telemetry::istio_metrics::{HttpSample, IstioMetrics, Protocol, SecurityPolicy, SeriesKey};
use crate::telemetry::peer_header;

/// Where a forwarded request went (its endpoint's workload, its cluster's service).
#[derive(Debug, Clone)]
pub struct IstioDestination {
    pub workload: Option<Arc<WorkloadMetadata>>,
    pub service: Option<Arc<ServiceMetadata>>,
}

/// One inbound connection's caller, as its mesh header and certificate said: the header's
/// bytes are compared with the last ones, so a connection's requests decode it once.
#[derive(Debug, Default)]
pub struct PeerCache {
    last_header: Mutex<Option<(HeaderValue, Arc<WorkloadMetadata>)>>,
    /// The peer known by its SPIFFE ID alone (no header, or one that is not its own).
    by_principal: OnceLock<Arc<WorkloadMetadata>>,
}

/// The count of a gRPC request's messages as its body streams upstream (in the request's
/// extensions; only gRPC requests on listeners that report Istio metrics carry one).
#[derive(Debug, Clone, Default)]
pub struct GrpcRequestMessages(pub Arc<AtomicU64>);

/// What the request brings to its series.
pub struct IstioRequest {
    started: Instant,
    request_messages: Option<GrpcRequestMessages>,
    /// Set by the router once it has chosen an endpoint (None: answered before that).
    pub destination: Option<IstioDestination>,
    /// The caller, on a destination reporter.
    source: Option<Arc<WorkloadMetadata>>,
    protocol: Protocol,
    request_bytes: u64,
}

/// Called for every request of a listener that reports Istio metrics, with the mesh header the
/// request arrived with (already taken out of it: the app never sees it).
pub fn begin(context: &HttpContext, istio: &IstioStatsConfig, request: &mut Request<Incoming>, peer_header: Option<HeaderValue>) -> Box<IstioRequest> {
    let headers = request.headers();
    let grpc = headers.get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    // The body streams to the upstream out of sight; its declared length is what is known.
    let request_bytes = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).unwrap_or(0);
    let source = (istio.reporter == Reporter::Destination).then(|| inbound_peer(context, peer_header));
    let request_messages = grpc.then(GrpcRequestMessages::default);
    if let Some(counter) = &request_messages {
        request.extensions_mut().insert(counter.clone());
    }
    Box::new(IstioRequest {
        started: Instant::now(),
        request_messages,
        destination: None,
        source,
        protocol: if grpc { Protocol::Grpc } else { Protocol::Http },
        request_bytes,
    })
}

/// The caller of an inbound request: its header's metadata when the header's principal is the
/// SPIFFE ID its certificate proved; else what that ID says; without mTLS, unknown.
fn inbound_peer(context: &HttpContext, header: Option<HeaderValue>) -> Arc<WorkloadMetadata> {
    let Some(identity) = &context.peer_identity else { return WorkloadMetadata::unknown() };
    let by_principal = || context.istio_peer.by_principal.get_or_init(|| Arc::new(WorkloadMetadata::from_principal(&identity.principal))).clone();
    let Some(header) = header else { return by_principal() };
    let mut last = context.istio_peer.last_header.lock().unwrap();
    if let Some((bytes, metadata)) = last.as_ref() {
        if *bytes == header {
            return metadata.clone();
        }
    }
    let metadata = match peer_header::decode(header.as_bytes()) {
        Some(claimed) if claimed.principal == identity.principal => Arc::new(claimed),
        _ => by_principal(),
    };
    *last = Some((header, metadata.clone()));
    metadata
}

/// Wraps the body so that the series is updated once it has gone out (or was dropped).
pub fn finish_at_body_end(context: &HttpContext, istio: &Arc<IstioStatsConfig>, begun: &IstioRequest, response: Response<ResponseBody>) -> Response<ResponseBody> {
    let (parts, body) = response.into_parts();
    let flags = parts.extensions.get::<LocalReplyCause>().map(|cause| cause.flags).unwrap_or_default();
    let (source, destination, service, security) = match istio.reporter {
        Reporter::Source => {
            let (workload, service) = begun.destination.clone().map_or((None, None), |t| (t.workload, t.service));
            (
                istio.workload.clone(),
                workload.unwrap_or_else(WorkloadMetadata::unknown),
                service.unwrap_or_else(ServiceMetadata::unknown),
                SecurityPolicy::Unknown,
            )
        }
        Reporter::Destination => (
            begun.source.clone().unwrap_or_else(WorkloadMetadata::unknown),
            istio.workload.clone(),
            istio.service.clone(),
            if context.peer_identity.is_some() { SecurityPolicy::MutualTls } else { SecurityPolicy::None },
        ),
    };
    let grpc_status = match begun.protocol {
        // A trailers-only response has it in its head; otherwise the trailers will say.
        Protocol::Grpc => parts.headers.get("grpc-status").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()),
        _ => None,
    };
    let key = SeriesKey {
        reporter: istio.reporter,
        source,
        destination,
        service,
        protocol: begun.protocol,
        response_code: parts.status.as_u16(),
        grpc_status,
        flags,
        security,
    };
    let body = ResponseBody::Istio(Box::new(IstioBody {
        inner: body,
        metrics: istio.metrics.clone(),
        key,
        started: begun.started,
        request_bytes: begun.request_bytes,
        request_messages: begun.request_messages.clone(),
        response_bytes: 0,
        messages: GrpcMessages::default(),
    }));
    Response::from_parts(parts, body)
}

/// A response body that counts what it sends and records the request's series when it ends.
pub struct IstioBody {
    inner: ResponseBody,
    metrics: Arc<IstioMetrics>,
    key: SeriesKey,
    started: Instant,
    request_bytes: u64,
    request_messages: Option<GrpcRequestMessages>,
    response_bytes: u64,
    messages: GrpcMessages,
}

impl IstioBody {
    pub(super) fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.response_bytes += data.len() as u64;
                if self.key.protocol == Protocol::Grpc {
                    self.messages.feed(data);
                }
            } else if let Some(trailers) = frame.trailers_ref() {
                if let Some(status) = trailers.get("grpc-status").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()) {
                    self.key.grpc_status = Some(status);
                }
            }
        }
        polled
    }

    pub(super) fn inner(&self) -> &ResponseBody {
        &self.inner
    }
}

impl Drop for IstioBody {
    fn drop(&mut self) {
        let ended = Instant::now();
        let sample = HttpSample {
            duration: ended.saturating_duration_since(self.started),
            request_bytes: self.request_bytes,
            response_bytes: self.response_bytes,
            request_messages: self.request_messages.as_ref().map_or(0, |counter| counter.0.load(Relaxed)),
            response_messages: self.messages.count,
        };
        self.metrics.record_http(&self.key, sample, ended);
    }
}

/// Counts gRPC messages in a stream of data frames (each message: a 1-byte flag, a 4-byte
/// big-endian length, then that many bytes), whatever way the frames cut them.
#[derive(Debug, Default)]
pub struct GrpcMessages {
    pub count: u64,
    /// Bytes of the current message's prefix seen so far (0..5).
    prefix_seen: usize,
    prefix: [u8; 5],
    /// Bytes of the current message still to skip.
    remaining: u64,
}

impl GrpcMessages {
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.remaining > 0 {
                let skip = (self.remaining.min(data.len() as u64)) as usize;
                self.remaining -= skip as u64;
                data = &data[skip..];
                continue;
            }
            let take = (5 - self.prefix_seen).min(data.len());
            self.prefix[self.prefix_seen..self.prefix_seen + take].copy_from_slice(&data[..take]);
            self.prefix_seen += take;
            data = &data[take..];
            if self.prefix_seen == 5 {
                self.count += 1;
                self.prefix_seen = 0;
                self.remaining = u32::from_be_bytes([self.prefix[1], self.prefix[2], self.prefix[3], self.prefix[4]]) as u64;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(len: usize) -> Vec<u8> {
        let mut out = vec![0];
        out.extend_from_slice(&(len as u32).to_be_bytes());
        out.extend(std::iter::repeat_n(7u8, len));
        out
    }

    #[test]
    fn grpc_messages_are_counted_however_frames_cut_them() {
        let stream: Vec<u8> = [message(3), message(0), message(70_000), message(1)].concat();
        for chunk in [1, 2, 4, 5, 6, 1000, stream.len()] {
            let mut counter = GrpcMessages::default();
            for piece in stream.chunks(chunk) {
                counter.feed(piece);
            }
            assert_eq!(counter.count, 4, "chunks of {chunk}");
        }
    }
}
