//! Per-endpoint connection pools: HTTP/1.1 keep-alive connections reused one request at a time,
//! or one multiplexed HTTP/2 connection; either over plain TCP or the cluster's (m)TLS.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::http::request_body::RequestBody;
use crate::model::tls::UpstreamTls;
use crate::model::{ClusterConfig, UpstreamProtocol};
use crate::telemetry::metrics::{ClusterStats, TlsDirection, TlsStats};
use crate::transport::tls::{upstream_handshake, UpstreamStream};

#[derive(Debug)]
pub enum UpstreamError {
    ConnectTimeout,
    ConnectFailed(std::io::Error),
    /// The TLS handshake with the upstream failed (its certificate was refused, or it refused ours).
    Tls(std::io::Error),
    Handshake(hyper::Error),
    /// The request was (possibly) sent and the exchange failed: not safe to retry blindly.
    Reset(hyper::Error),
}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpstreamError::ConnectTimeout => write!(f, "connection timeout"),
            UpstreamError::ConnectFailed(e) => write!(f, "connection failure ({e})"),
            UpstreamError::Tls(e) => write!(f, "connection failure (TLS error: {e})"),
            UpstreamError::Handshake(e) => write!(f, "protocol error ({})", with_causes(e)),
            UpstreamError::Reset(e) => write!(f, "remote reset ({})", with_causes(e)),
        }
    }
}

/// hyper's errors say "http2 error"; the cause underneath says which one.
fn with_causes(error: &hyper::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[derive(Clone)]
pub struct Pool(Arc<PoolInner>);

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool").field("address", &self.0.address).finish()
    }
}

struct PoolInner {
    address: SocketAddr,
    protocol: UpstreamProtocol,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_requests_per_connection: u32,
    max_response_headers_bytes: usize,
    tls: Option<Arc<UpstreamTls>>,
    stats: Arc<ClusterStats>,
    tls_stats: Arc<TlsStats>,
    idle_http1: Mutex<Vec<IdleHttp1>>,
    http2: Mutex<Option<http2::SendRequest<RequestBody>>>,
    /// Serializes HTTP/2 connection setup so a burst of requests opens one connection, not many.
    http2_connecting: tokio::sync::Mutex<()>,
}

struct IdleHttp1 {
    sender: http1::SendRequest<RequestBody>,
    idle_since: Instant,
    uses: u32,
}

/// Upper bound on idle HTTP/1.1 connections kept per endpoint; the rest are closed.
const MAX_IDLE_HTTP1: usize = 256;

/// An HTTP/1.1 connection lent to one exchange. Dropped without `release`, the connection is
/// discarded (an error or an upgrade took it).
pub struct ConnectionLease {
    pool: Pool,
    sender: http1::SendRequest<RequestBody>,
    uses: u32,
}

impl ConnectionLease {
    /// The response body has been read to its end: give the connection back to the pool.
    pub fn release(self) {
        let ConnectionLease { pool, mut sender, uses } = self;
        let limit = pool.0.max_requests_per_connection;
        if limit != 0 && uses >= limit {
            return;
        }
        // Usually the connection is ready again by the time its body's end reached us; if not,
        // a small task waits for it rather than losing the connection.
        if sender.is_ready() {
            pool.put_idle(sender, uses);
        } else {
            tokio::spawn(async move {
                if sender.ready().await.is_ok() {
                    pool.put_idle(sender, uses);
                }
            });
        }
    }
}

impl Pool {
    pub fn new(address: SocketAddr, cluster: &ClusterConfig, stats: Arc<ClusterStats>, tls_stats: Arc<TlsStats>) -> Self {
        Pool(Arc::new(PoolInner {
            address,
            protocol: cluster.protocol,
            connect_timeout: cluster.connect_timeout,
            idle_timeout: cluster.idle_timeout,
            max_requests_per_connection: cluster.max_requests_per_connection,
            max_response_headers_bytes: cluster.max_response_headers_bytes as usize,
            tls: cluster.tls.clone(),
            stats,
            tls_stats,
            idle_http1: Mutex::new(Vec::new()),
            http2: Mutex::new(None),
            http2_connecting: tokio::sync::Mutex::new(()),
        }))
    }

    /// Send one request. For HTTP/1.1 the connection comes back as a lease, to be released once
    /// the response body has been read to its end (an HTTP/2 connection is shared, no lease).
    pub async fn send(
        &self,
        request: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Option<ConnectionLease>), UpstreamError> {
        match self.0.protocol {
            UpstreamProtocol::Http1 => self.send_http1(request).await.map(|(r, lease)| (r, Some(lease))),
            UpstreamProtocol::Http2 => self.send_http2(request).await.map(|r| (r, None)),
        }
    }

    async fn send_http1(&self, mut request: Request<RequestBody>) -> Result<(Response<Incoming>, ConnectionLease), UpstreamError> {
        // A pooled connection may have been closed by the server while idle; if the request was
        // not written, hyper hands it back and it is sent again on a fresh connection.
        loop {
            let (mut sender, uses, pooled) = match self.checkout_http1() {
                Some(idle) => (idle.sender, idle.uses, true),
                None => (self.connect_http1().await?, 0, false),
            };
            match sender.try_send_request(request).await {
                Ok(response) => {
                    return Ok((response, ConnectionLease { pool: self.clone(), sender, uses: uses + 1 }));
                }
                Err(mut error) => match error.take_message() {
                    Some(unsent) if pooled => request = unsent,
                    _ => return Err(UpstreamError::Reset(error.into_error())),
                },
            }
        }
    }

    fn checkout_http1(&self) -> Option<IdleHttp1> {
        let mut idle = self.0.idle_http1.lock().unwrap();
        while let Some(candidate) = idle.pop() {
            if candidate.sender.is_ready() && candidate.idle_since.elapsed() < self.0.idle_timeout {
                return Some(candidate);
            }
        }
        None
    }

    fn put_idle(&self, sender: http1::SendRequest<RequestBody>, uses: u32) {
        let mut idle = self.0.idle_http1.lock().unwrap();
        if idle.len() < MAX_IDLE_HTTP1 {
            idle.push(IdleHttp1 { sender, idle_since: Instant::now(), uses });
        }
    }

    async fn connect(&self) -> Result<TokioIo<UpstreamStream>, UpstreamError> {
        self.0.stats.connections_total.fetch_add(1, Relaxed);
        let stream = match tokio::time::timeout(self.0.connect_timeout, TcpStream::connect(self.0.address)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                self.0.stats.connect_failures.fetch_add(1, Relaxed);
                return Err(UpstreamError::ConnectFailed(e));
            }
            Err(_) => {
                self.0.stats.connect_failures.fetch_add(1, Relaxed);
                return Err(UpstreamError::ConnectTimeout);
            }
        };
        let _ = stream.set_nodelay(true);
        let handshake = upstream_handshake(stream, self.0.tls.as_deref(), self.0.address, &self.0.tls_stats);
        match tokio::time::timeout(self.0.connect_timeout, handshake).await {
            Ok(Ok(stream)) => Ok(TokioIo::new(stream)),
            Ok(Err(e)) => {
                self.0.stats.connect_failures.fetch_add(1, Relaxed);
                Err(UpstreamError::Tls(e))
            }
            Err(_) => {
                self.0.stats.connect_failures.fetch_add(1, Relaxed);
                self.0.tls_stats.handshake_error(TlsDirection::Upstream, "timeout");
                Err(UpstreamError::ConnectTimeout)
            }
        }
    }

    async fn connect_http1(&self) -> Result<http1::SendRequest<RequestBody>, UpstreamError> {
        let io = self.connect().await?;
        let (sender, connection) = http1::Builder::new()
            .max_buf_size(self.0.max_response_headers_bytes.max(8192) + 8192)
            .handshake(io)
            .await
            .map_err(UpstreamError::Handshake)?;
        tokio::spawn(connection.with_upgrades());
        Ok(sender)
    }

    async fn send_http2(&self, mut request: Request<RequestBody>) -> Result<Response<Incoming>, UpstreamError> {
        for _ in 0..2 {
            let mut sender = self.http2_sender().await?;
            if sender.ready().await.is_err() {
                self.forget_http2();
                continue;
            }
            match sender.try_send_request(request).await {
                Ok(response) => return Ok(response),
                Err(mut error) => match error.take_message() {
                    Some(unsent) => {
                        // Refused before it was sent (e.g. GOAWAY): open a fresh connection.
                        self.forget_http2();
                        request = unsent;
                    }
                    None => return Err(UpstreamError::Reset(error.into_error())),
                },
            }
        }
        // Two fresh connections in a row refused the request before sending it.
        let mut sender = self.http2_sender().await?;
        sender.send_request(request).await.map_err(UpstreamError::Reset)
    }

    async fn http2_sender(&self) -> Result<http2::SendRequest<RequestBody>, UpstreamError> {
        if let Some(sender) = self.live_http2() {
            return Ok(sender);
        }
        let _connecting = self.0.http2_connecting.lock().await;
        if let Some(sender) = self.live_http2() {
            return Ok(sender);
        }
        let io = self.connect().await?;
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(1024 * 1024)
            .initial_connection_window_size(4 * 1024 * 1024)
            .max_header_list_size(self.0.max_response_headers_bytes as u32)
            .keep_alive_interval(Duration::from_secs(30))
            // h2 counts a stream it cancels itself (a response body dropped before its end, as
            // when a downstream client goes away) as a "local error reset" and closes the whole
            // connection after 1024 of them. A proxy cancels streams routinely; that guard is for
            // servers facing abusive peers, not for a client of its own upstream.
            .max_local_error_reset_streams(None)
            .handshake(io)
            .await
            .map_err(UpstreamError::Handshake)?;
        tokio::spawn(connection);
        *self.0.http2.lock().unwrap() = Some(sender.clone());
        Ok(sender)
    }

    fn live_http2(&self) -> Option<http2::SendRequest<RequestBody>> {
        let shared = self.0.http2.lock().unwrap();
        shared.as_ref().filter(|s| !s.is_closed()).cloned()
    }

    fn forget_http2(&self) {
        *self.0.http2.lock().unwrap() = None;
    }

    /// Drop the idle HTTP/1.1 connections and stop sharing the HTTP/2 one (its streams in flight
    /// finish; it closes once they have), so the next request connects afresh.
    pub fn forget_connections(&self) {
        self.0.idle_http1.lock().unwrap().clear();
        self.forget_http2();
    }

    /// Close idle HTTP/1.1 connections past the cluster's idle timeout.
    pub fn close_expired(&self) {
        let timeout = self.0.idle_timeout;
        self.0.idle_http1.lock().unwrap().retain(|c| c.idle_since.elapsed() < timeout && c.sender.is_ready());
    }
}
