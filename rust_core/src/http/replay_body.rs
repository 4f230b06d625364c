//! A downstream request body that a retry can send again: read once, kept up to a limit, and
//! replayed to each later try, which then reads on from where the earlier ones stopped.

use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

/// The body of one request with a retry policy, shared by its tries. Made only for routes with
/// a retry policy and requests with a body; a plain request streams its Incoming directly.
#[derive(Clone)]
pub struct Replay(Arc<Mutex<Shared>>);

struct Shared {
    incoming: Incoming,
    /// What has been read so far, while it fits the limit.
    chunks: Vec<Bytes>,
    buffered: usize,
    limit: usize,
    /// No further try can be made: more than `limit` was read (the chunks are gone then), or a
    /// response is being passed on.
    overflowed: bool,
    /// The downstream body has ended (its trailers, if any, are kept).
    ended: bool,
    trailers: Option<HeaderMap>,
    /// The try whose body may read the downstream body; earlier tries' bodies are cut off.
    current_try: u32,
    size_hint: SizeHint,
}

/// Why a try's body stopped.
#[derive(Debug)]
pub enum ReplayError {
    /// The downstream body failed (the client broke or abandoned it).
    Downstream(hyper::Error),
    /// A later try took over: this try's exchange is abandoned (its upstream stream is reset or
    /// its connection closed, as Envoy resets a retried request).
    Superseded,
}

impl fmt::Display for ReplayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplayError::Downstream(e) => write!(f, "downstream request body: {e}"),
            ReplayError::Superseded => write!(f, "request body superseded by a retry"),
        }
    }
}

impl std::error::Error for ReplayError {}

impl Replay {
    pub fn new(incoming: Incoming, limit: usize) -> Self {
        let size_hint = incoming.size_hint();
        Replay(Arc::new(Mutex::new(Shared {
            incoming,
            chunks: Vec::new(),
            buffered: 0,
            limit,
            overflowed: false,
            ended: false,
            trailers: None,
            current_try: 0,
            size_hint,
        })))
    }

    /// The body for try `number` (1 for the first); from now on earlier tries' bodies fail.
    pub fn body_for_try(&self, number: u32) -> ReplayBody {
        self.0.lock().unwrap().current_try = number;
        ReplayBody { shared: self.clone(), try_number: number, next_chunk: 0, trailers_sent: false }
    }

    /// Stop every try's body (before a retry's backoff, so nothing reads on meanwhile).
    pub fn supersede(&self) {
        self.0.lock().unwrap().current_try = u32::MAX;
    }

    /// No further try will be made (the response is being passed on): the rest of the body
    /// streams through to the try under way without being kept. What is kept stays, since a
    /// retry's body may not have sent all of it yet (an upstream may answer before reading).
    pub fn commit(&self) {
        self.0.lock().unwrap().overflowed = true;
    }

    /// Whether the body read so far can still be sent again.
    pub fn replayable(&self) -> bool {
        !self.0.lock().unwrap().overflowed
    }
}

pub struct ReplayBody {
    shared: Replay,
    try_number: u32,
    /// The next kept chunk this try has not sent yet.
    next_chunk: usize,
    trailers_sent: bool,
}

impl ReplayBody {
    pub fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, ReplayError>>> {
        let mut shared = self.shared.0.lock().unwrap();
        if shared.current_try != self.try_number {
            return Poll::Ready(Some(Err(ReplayError::Superseded)));
        }
        if let Some(chunk) = shared.chunks.get(self.next_chunk) {
            self.next_chunk += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk.clone()))));
        }
        if shared.ended {
            if !self.trailers_sent {
                self.trailers_sent = true;
                if let Some(trailers) = &shared.trailers {
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers.clone()))));
                }
            }
            return Poll::Ready(None);
        }
        let polled = Pin::new(&mut shared.incoming).poll_frame(cx);
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                let frame = match frame.into_data() {
                    Ok(data) => {
                        if !shared.overflowed {
                            if shared.buffered + data.len() > shared.limit {
                                shared.overflowed = true;
                                shared.chunks = Vec::new();
                            } else {
                                shared.buffered += data.len();
                                shared.chunks.push(data.clone());
                                self.next_chunk += 1;
                            }
                        }
                        Frame::data(data)
                    }
                    Err(frame) => match frame.into_trailers() {
                        Ok(trailers) => {
                            shared.ended = true;
                            shared.trailers = Some(trailers.clone());
                            self.trailers_sent = true;
                            Frame::trailers(trailers)
                        }
                        Err(other) => other,
                    },
                };
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                shared.ended = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(ReplayError::Downstream(error)))),
            Poll::Pending => Poll::Pending,
        }
    }

    pub fn is_end_stream(&self) -> bool {
        let shared = self.shared.0.lock().unwrap();
        shared.ended && self.next_chunk >= shared.chunks.len() && (self.trailers_sent || shared.trailers.is_none())
    }

    /// The whole body's, as the downstream announced it (hyper frames the upstream request by it).
    pub fn size_hint(&self) -> SizeHint {
        self.shared.0.lock().unwrap().size_hint
    }
}
