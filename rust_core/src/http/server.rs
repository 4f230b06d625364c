//! Serving one downstream connection as HTTP/1.1 or HTTP/2 with hyper, with graceful shutdown.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use super::proxy::{handle, HttpContext};
use crate::transport::activity::{ActivityStream, LastActivity};

/// Serve until the connection ends. When `drain` flips to true, or no byte has moved for the idle
/// timeout, HTTP/1.1 finishes the request in flight and answers it with `Connection: close`;
/// HTTP/2 sends GOAWAY and finishes open streams.
pub async fn serve_http<I>(io: I, http2: bool, context: Arc<HttpContext>, mut drain: watch::Receiver<bool>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = context.settings.limits.clone();
    let stats = context.stats.clone();
    let service = service_fn(move |request| handle(context.clone(), request));
    let activity = LastActivity::new();
    let io = TokioIo::new(ActivityStream::new(io, activity.clone()));
    let idle = Idle { activity, limit: limits.idle_timeout };
    if http2 {
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .max_concurrent_streams(limits.max_concurrent_streams)
            .max_header_list_size(limits.max_request_headers_bytes)
            .initial_stream_window_size(limits.initial_stream_window_size)
            .initial_connection_window_size(limits.initial_connection_window_size)
            .max_send_buf_size(1024 * 1024);
        let connection = builder.serve_connection(io, service);
        tokio::pin!(connection);
        let ended = run_until_drained(connection.as_mut(), &mut drain, &idle, |c| c.graceful_shutdown()).await;
        if ended.as_ref().is_err_and(is_http2_protocol_error) {
            stats.protocol_errors.fetch_add(1, Relaxed);
        }
    } else {
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(limits.request_headers_timeout)
            // hyper refuses heads larger than its read buffer with 431.
            .max_buf_size((limits.max_request_headers_bytes as usize).max(8192))
            .max_headers(limits.max_headers_count as usize);
        let connection = builder.serve_connection(io, service).with_upgrades();
        tokio::pin!(connection);
        let ended = run_until_drained(connection.as_mut(), &mut drain, &idle, |c| c.graceful_shutdown()).await;
        // hyper has answered a malformed head itself (400, 431, ...); a broken body is counted
        // where it is read (request_body.rs).
        if ended.as_ref().is_err_and(hyper::Error::is_parse) {
            stats.protocol_errors.fetch_add(1, Relaxed);
        }
    }
}

struct Idle {
    activity: Arc<LastActivity>,
    limit: Option<Duration>,
}

impl Idle {
    /// Resolves once no byte has moved for the limit (never, without a limit).
    async fn expired(&self) {
        let Some(limit) = self.limit else { return std::future::pending().await };
        loop {
            let deadline = self.activity.idle_deadline(limit);
            if deadline <= tokio::time::Instant::now() {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// Returns how the connection ended.
async fn run_until_drained<C, F>(mut connection: std::pin::Pin<&mut C>, drain: &mut watch::Receiver<bool>, idle: &Idle, shutdown: F) -> C::Output
where
    C: std::future::Future,
    F: FnOnce(std::pin::Pin<&mut C>),
{
    if !*drain.borrow() {
        tokio::select! {
            ended = connection.as_mut() => return ended,
            _ = drain.wait_for(|draining| *draining) => {}
            _ = idle.expired() => {}
        }
    }
    shutdown(connection.as_mut());
    connection.await
}

/// A connection error h2 found in the client's frames (it sent GOAWAY with an error code), as
/// opposed to an I/O error or the client going away.
fn is_http2_protocol_error(error: &hyper::Error) -> bool {
    let mut cause = std::error::Error::source(error);
    while let Some(current) = cause {
        if let Some(h2) = current.downcast_ref::<h2::Error>() {
            return h2.is_go_away() && h2.is_library() && h2.reason().is_some_and(|r| r != h2::Reason::NO_ERROR);
        }
        cause = current.source();
    }
    false
}
