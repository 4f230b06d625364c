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
    /// Set only on a mirrored request's first try: keeps what passes for the mirror's copy.
    tee: Option<Box<BodyTee>>,
    /// The downstream connection's context (a reference count, no allocation): its body faults
    /// and its listener's protocol-error counter.
    connection: Arc<HttpContext>,
    /// A gRPC request's messages, counted for Istio's metrics as they pass (boxed: rare).
    grpc_messages: Option<Box<(super::istio_stats::GrpcMessages, super::istio_stats::GrpcRequestMessages)>>,
}

enum Source {
    /// The downstream body itself, sent once.
    Streaming(Incoming),
    /// One try's view of a body kept for retries.
    Replay(ReplayBody),
    /// A retried request that had no body.
    Empty,
    /// A mirror's copy of a whole body.
    Copied(CopiedBody),
}

impl RequestBody {
    pub fn new(incoming: Incoming, connection: Arc<HttpContext>) -> Self {
        RequestBody { source: Source::Streaming(incoming), tee: None, connection, grpc_messages: None }
    }

    /// Counts the gRPC messages this body passes into `counter` (a first try's only: a retried
    /// body is not counted again).
    pub fn counting(mut self, counter: Option<super::istio_stats::GrpcRequestMessages>) -> Self {
        self.grpc_messages = counter.map(|counter| Box::new((Default::default(), counter)));
        self
    }

    pub fn replay(body: ReplayBody, connection: Arc<HttpContext>) -> Self {
        RequestBody { source: Source::Replay(body), tee: None, connection, grpc_messages: None }
    }

    pub fn empty(connection: Arc<HttpContext>) -> Self {
        RequestBody { source: Source::Empty, tee: None, connection, grpc_messages: None }
    }

    pub fn copied(body: CopiedBody, connection: Arc<HttpContext>) -> Self {
        RequestBody { source: Source::Copied(body), tee: None, connection, grpc_messages: None }
    }

    /// What this body passes on is also kept for a mirror's copy.
    pub fn with_tee(mut self, tee: Box<BodyTee>) -> Self {
        self.tee = Some(tee);
        self
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
        let polled = this.poll_source(cx);
        if let (Some(counting), Poll::Ready(Some(Ok(frame)))) = (&mut this.grpc_messages, &polled) {
            if let Some(data) = frame.data_ref() {
                let (messages, counter) = &mut **counting;
                let before = messages.count;
                messages.feed(data);
                counter.0.fetch_add(messages.count - before, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let ended = this.tee.is_some() && this.source_ended();
        if let Some(tee) = &mut this.tee {
            match &polled {
                Poll::Ready(Some(Ok(frame))) => {
                    tee.keep(frame);
                    // hyper stops polling a body that says it has ended.
                    if ended {
                        tee.finish();
                    }
                }
                Poll::Ready(None) => tee.finish(),
                // A failed body leaves the copy incomplete: the tee drops unsent.
                Poll::Ready(Some(Err(_))) => this.tee = None,
                Poll::Pending => {}
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.source_ended()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.source {
            Source::Streaming(incoming) => incoming.size_hint(),
            Source::Replay(body) => body.size_hint(),
            Source::Empty => SizeHint::with_exact(0),
            Source::Copied(body) => SizeHint::with_exact(body.data.iter().map(|d| d.len() as u64).sum()),
        }
    }
}

impl RequestBody {
    fn source_ended(&self) -> bool {
        match &self.source {
            Source::Streaming(incoming) => incoming.is_end_stream(),
            Source::Replay(body) => body.is_end_stream(),
            Source::Empty => true,
            Source::Copied(body) => body.data.is_empty() && body.trailers.is_none(),
        }
    }

    fn poll_source(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self;
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
            Source::Copied(body) => Poll::Ready(match body.data.pop_front() {
                Some(data) => Some(Ok(Frame::data(data))),
                None => body.trailers.take().map(|trailers| Ok(Frame::trailers(trailers))),
            }),
        }
    }
}

/// A whole request body kept for a mirror's copy: its data, then its trailers if it had any.
#[derive(Clone, Default)]
pub struct CopiedBody {
    data: std::collections::VecDeque<Bytes>,
    trailers: Option<http::HeaderMap>,
}

impl CopiedBody {
    /// A body that is one buffer (a gRPC message made here).
    pub fn whole(data: Bytes) -> CopiedBody {
        CopiedBody { data: std::collections::VecDeque::from([data]), trailers: None }
    }
}

/// A mirrored request's body as it passes, kept up to a limit and handed over whole at its end.
/// Dropped before that (a body that fails, or outgrows the limit), the copy is abandoned.
pub struct BodyTee {
    body: CopiedBody,
    kept: usize,
    limit: usize,
    /// The body's declared length (content-length), when it has one.
    expected: Option<u64>,
    done: Option<tokio::sync::oneshot::Sender<CopiedBody>>,
}

impl BodyTee {
    pub fn new(limit: usize, expected: Option<u64>, done: tokio::sync::oneshot::Sender<CopiedBody>) -> Box<Self> {
        Box::new(BodyTee { body: CopiedBody::default(), kept: 0, limit, expected, done: Some(done) })
    }

    fn keep(&mut self, frame: &Frame<Bytes>) {
        if self.done.is_none() {
            return;
        }
        if let Some(data) = frame.data_ref() {
            self.kept += data.len();
            if self.kept > self.limit {
                // Too long to keep: the copy is abandoned, and what was kept is let go now.
                self.done = None;
                self.body = CopiedBody::default();
                return;
            }
            self.body.data.push_back(data.clone());
        } else if let Some(trailers) = frame.trailers_ref() {
            self.body.trailers = Some(trailers.clone());
        }
    }

    fn finish(&mut self) {
        if let Some(done) = self.done.take() {
            let _ = done.send(std::mem::take(&mut self.body));
        }
    }
}

impl Drop for BodyTee {
    /// hyper stops polling a body of declared length once that much is written, without asking
    /// whether it has ended: a body dropped complete is handed over all the same.
    fn drop(&mut self) {
        if self.expected == Some(self.kept as u64) {
            self.finish();
        }
    }
}
