//! The response body type the proxy returns: an upstream's streaming body or a local one.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::upstream::pool::ConnectionLease;

pub enum ResponseBody {
    /// An upstream response; its HTTP/1.1 connection goes back to the pool at the body's end.
    Upstream(Incoming, Option<ConnectionLease>),
    Local(Option<Bytes>),
    /// Either of the above, on a connection manager with access logs (boxed: rare, and kept out
    /// of the size of every other body).
    Logged(Box<super::access_log::LoggedBody>),
    /// Any of the above, on a sampled request of a tracing connection manager (boxed likewise).
    Traced(Box<super::trace_span::TracedBody>),
    /// Either of the above, on a listener that reports Istio's metrics (boxed, as Logged).
    Istio(Box<super::istio_stats::IstioBody>),
}

impl ResponseBody {
    pub fn empty() -> Self {
        ResponseBody::Local(None)
    }

    pub fn text(text: impl Into<Bytes>) -> Self {
        let bytes = text.into();
        ResponseBody::Local((!bytes.is_empty()).then_some(bytes))
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ResponseBody::Upstream(body, lease) => {
                let polled = Pin::new(&mut *body).poll_frame(cx);
                match &polled {
                    // The server stops polling once is_end_stream() says so: release here too.
                    Poll::Ready(None) => release(lease),
                    Poll::Ready(Some(Ok(_))) if body.is_end_stream() => release(lease),
                    Poll::Ready(Some(Err(_))) => {
                        if let Some(lease) = lease.take() {
                            lease.failed();
                        }
                    }
                    _ => {}
                }
                polled
            }
            ResponseBody::Local(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            ResponseBody::Logged(logged) => logged.poll_frame(cx),
            ResponseBody::Traced(traced) => traced.poll_frame(cx),
            ResponseBody::Istio(counted) => counted.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Upstream(body, _) => body.is_end_stream(),
            ResponseBody::Local(bytes) => bytes.is_none(),
            ResponseBody::Logged(logged) => logged.inner().is_end_stream(),
            ResponseBody::Traced(traced) => traced.inner().is_end_stream(),
            ResponseBody::Istio(counted) => counted.inner().is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Upstream(body, _) => body.size_hint(),
            ResponseBody::Local(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            ResponseBody::Logged(logged) => logged.inner().size_hint(),
            ResponseBody::Traced(traced) => traced.inner().size_hint(),
            ResponseBody::Istio(counted) => counted.inner().size_hint(),
        }
    }
}

fn release(lease: &mut Option<ConnectionLease>) {
    if let Some(lease) = lease.take() {
        lease.release();
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // An empty body is complete before anyone polls it (e.g. a 204, or a HEAD response).
        if let ResponseBody::Upstream(body, lease) = self {
            if body.is_end_stream() {
                release(lease);
            }
        }
    }
}
