//! A stream wrapper that records when bytes last moved, so idle connections can be closed.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Milliseconds since the process's first use of this clock, at the last read or write.
#[derive(Debug)]
pub struct LastActivity(AtomicU64);

impl LastActivity {
    pub fn new() -> Arc<Self> {
        Arc::new(LastActivity(AtomicU64::new(Self::now_millis())))
    }

    fn now_millis() -> u64 {
        epoch().elapsed().as_millis() as u64
    }

    fn touch(&self) {
        self.0.store(Self::now_millis(), Relaxed);
    }

    /// When the connection becomes idle for `limit` if nothing moves in between.
    pub fn idle_deadline(&self, limit: Duration) -> tokio::time::Instant {
        let last = epoch() + Duration::from_millis(self.0.load(Relaxed));
        tokio::time::Instant::from_std(last + limit)
    }
}

pub struct ActivityStream<S> {
    inner: S,
    activity: Arc<LastActivity>,
}

impl<S> ActivityStream<S> {
    pub fn new(inner: S, activity: Arc<LastActivity>) -> Self {
        ActivityStream { inner, activity }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ActivityStream<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if result.is_ready() {
            self.activity.touch();
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ActivityStream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if result.is_ready() {
            self.activity.touch();
        }
        result
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if result.is_ready() {
            self.activity.touch();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
