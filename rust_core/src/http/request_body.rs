//! The downstream request body on its way upstream: hyper's Incoming (or its replay, for a
//! retry), whose failures are recorded as the client's, so a request body the client broke is
//! never blamed on the upstream.

use std::io::ErrorKind;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::proxy::HttpContext;
use super::replay_body::{ReplayBody, ReplayError};

/// How a downstream request body failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFault {
    /// Its framing is broken (a chunk size that is not hex or overflows, a bad chunk end): a
    /// protocol error of the client, answered 400 as Envoy's codec does.
    Malformed,
    /// The client stopped sending it (closed or reset the connection mid-body).
    Aborted,
}

impl BodyFault {
    /// hyper's HTTP/1.1 decoder reports broken chunked framing as InvalidInput or InvalidData,
    /// and a connection that ended mid-body as UnexpectedEof or another I/O error. Errors of an
    /// HTTP/2 stream (resets, content-length mismatches) are already answered by h2 itself with
    /// RST_STREAM; they count as aborted here, not as a connection's protocol error.
    pub fn of(error: &hyper::Error) -> BodyFault {
        let io_kind = std::error::Error::source(error)
            .and_then(|cause| cause.downcast_ref::<std::io::Error>())
            .map(std::io::Error::kind);
        match io_kind {
            Some(ErrorKind::InvalidInput | ErrorKind::InvalidData) => BodyFault::Malformed,
            _ => BodyFault::Aborted,
        }
    }
}

/// The request body failures of one downstream connection. The body is polled by the upstream
/// connection's task, out of the handler's sight; the handler compares a mark taken before it
/// sends with the count after the upstream exchange failed. Per connection, not per request, so
/// that no request allocates: exact for HTTP/1.1 (one request at a time); on HTTP/2 a failure is
/// attributed to the same client connection, which is who caused it.
#[derive(Debug, Default)]
pub struct BodyFaults {
    count: AtomicU64,
    last_malformed: AtomicBool,
}

impl BodyFaults {
    pub fn mark(&self) -> u64 {
        self.count.load(Ordering::Acquire)
    }

    /// The latest fault recorded since `mark`, if any.
    pub fn since(&self, mark: u64) -> Option<BodyFault> {
        if self.count.load(Ordering::Acquire) == mark {
            return None;
        }
        Some(if self.last_malformed.load(Ordering::Relaxed) { BodyFault::Malformed } else { BodyFault::Aborted })
    }

    fn record(&self, fault: BodyFault) {
        self.last_malformed.store(fault == BodyFault::Malformed, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Release);
    }
}

pub struct RequestBody {
    source: Source,
    /// The downstream connection's context (a reference count, no allocation): its body faults
    /// and its listener's protocol-error counter.
    connection: Arc<HttpContext>,
}

enum Source {
    /// The downstream body itself, sent once.
    Streaming(Incoming),
    /// One try's view of a body kept for retries.
    Replay(ReplayBody),
    /// A retried request that had no body.
    Empty,
}

impl RequestBody {
    pub fn new(incoming: Incoming, connection: Arc<HttpContext>) -> Self {
        RequestBody { source: Source::Streaming(incoming), connection }
    }

    pub fn replay(body: ReplayBody, connection: Arc<HttpContext>) -> Self {
        RequestBody { source: Source::Replay(body), connection }
    }

    pub fn empty(connection: Arc<HttpContext>) -> Self {
        RequestBody { source: Source::Empty, connection }
    }

    fn record(&self, error: &hyper::Error) {
        let fault = BodyFault::of(error);
        if fault == BodyFault::Malformed {
            self.connection.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
        }
        self.connection.body_faults.record(fault);
    }
}

/// Boxed only when a body fails: a failure of the downstream body, or a retry taking over.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        match &mut this.source {
            Source::Streaming(incoming) => match Pin::new(incoming).poll_frame(cx) {
                Poll::Ready(Some(Err(error))) => {
                    this.record(&error);
                    Poll::Ready(Some(Err(Box::new(error))))
                }
                Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
            Source::Replay(body) => match body.poll_frame(cx) {
                Poll::Ready(Some(Err(ReplayError::Downstream(error)))) => {
                    this.record(&error);
                    Poll::Ready(Some(Err(Box::new(error))))
                }
                Poll::Ready(Some(Err(superseded))) => Poll::Ready(Some(Err(Box::new(superseded)))),
                Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
            Source::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.source {
            Source::Streaming(incoming) => incoming.is_end_stream(),
            Source::Replay(body) => body.is_end_stream(),
            Source::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.source {
            Source::Streaming(incoming) => incoming.size_hint(),
            Source::Replay(body) => body.size_hint(),
            Source::Empty => SizeHint::with_exact(0),
        }
    }
}
