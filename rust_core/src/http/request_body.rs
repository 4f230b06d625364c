//! The downstream request body on its way upstream: hyper's Incoming, whose failures are recorded
//! as the client's, so a request body the client broke is never blamed on the upstream.

use std::io::ErrorKind;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::proxy::HttpContext;

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
    incoming: Incoming,
    /// The downstream connection's context (a reference count, no allocation): its body faults
    /// and its listener's protocol-error counter.
    connection: Arc<HttpContext>,
}

impl RequestBody {
    pub fn new(incoming: Incoming, connection: Arc<HttpContext>) -> Self {
        RequestBody { incoming, connection }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.incoming).poll_frame(cx);
        if let Poll::Ready(Some(Err(error))) = &polled {
            let fault = BodyFault::of(error);
            if fault == BodyFault::Malformed {
                this.connection.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
            }
            this.connection.body_faults.record(fault);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.incoming.size_hint()
    }
}
