//! Per-endpoint connection pools: HTTP/1.1 keep-alive connections reused one request at a time,
//! or one multiplexed HTTP/2 connection; either over plain TCP or the cluster's (m)TLS. The
//! cluster's circuit breakers for connections, pending and active requests are applied here.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::Either;
use futures_util::TryFutureExt;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use super::circuit_breaker::try_acquire;
use super::outlier::{HostMonitor, LocalResult};
use crate::http::request_body::RequestBody;
use crate::model::circuit_breaker::CircuitBreakers;
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
    /// A circuit breaker of the cluster is open (max_pending_requests or max_requests): the
    /// request was not sent. Not the endpoint's fault, and never retried (as in Envoy).
    Overflow,
}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpstreamError::ConnectTimeout => write!(f, "connection timeout"),
            UpstreamError::ConnectFailed(e) => write!(f, "connection failure ({e})"),
            UpstreamError::Tls(e) => write!(f, "connection failure (TLS error: {e})"),
            UpstreamError::Handshake(e) => write!(f, "protocol error ({})", with_causes(e)),
            UpstreamError::Reset(e) => write!(f, "remote reset ({})", with_causes(e)),
            UpstreamError::Overflow => write!(f, "overflow"),
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
    http2: Mutex<Option<SharedHttp2>>,
    /// Serializes HTTP/2 connection setup so a burst of requests opens one connection, not many.
    http2_connecting: tokio::sync::Mutex<()>,
    breakers: CircuitBreakers,
    /// The longest a request waits for a connection (meshctl.concurrency); None: no bound here.
    queue_timeout: Option<Duration>,
    /// This endpoint's connections, open or opening.
    open_connections: AtomicU64,
    /// Requests waiting for one of this endpoint's connections to come free or close (HTTP/1.1
    /// at max_connections); woken one at a time.
    waiting: AtomicU64,
    connection_freed: Notify,
    /// The same requests, oldest first: a connection slot freed while they wait goes to the
    /// oldest at once (give_or_free_slot), as Envoy moves a pending request onto a new
    /// connection in the event-loop turn that retired the old one.
    queue: Mutex<VecDeque<Arc<Ticket>>>,
}

/// A waiting request's place in the queue; `granted` once a freed connection slot is its own.
#[derive(Default)]
struct Ticket {
    granted: AtomicBool,
    wake: Notify,
}

struct SharedHttp2 {
    sender: http2::SendRequest<RequestBody>,
    /// Requests given this connection (for max_requests_per_connection).
    uses: u32,
    /// Given a request since the reaper last looked (a flag, so a request reads no clock).
    used: bool,
    /// When the reaper last found it used: it stops being shared after the idle timeout.
    idle_since: Instant,
}

struct IdleHttp1 {
    sender: http1::SendRequest<RequestBody>,
    idle_since: Instant,
    uses: u32,
    slot: ConnectionSlot,
}

/// Upper bound on idle HTTP/1.1 connections kept per endpoint; the rest are closed.
const MAX_IDLE_HTTP1: usize = 256;

/// One exchange's hold on its connection. The cluster counts it as an active request until the
/// lease goes (max_requests). An HTTP/1.1 connection goes back to the pool through `release`;
/// dropped without it, the connection is discarded (an error or an upgrade took it).
pub struct ConnectionLease {
    pool: Pool,
    /// The HTTP/1.1 connection, the requests it has carried and its max_connections slot; None
    /// on HTTP/2 (shared).
    http1: Option<(http1::SendRequest<RequestBody>, u32, ConnectionSlot)>,
    /// The endpoint's outlier detection, when its cluster has it: told of a failed body.
    pub(crate) outlier: Option<Arc<HostMonitor>>,
}

impl ConnectionLease {
    /// The upstream broke the response body (a reset, a connection closed early): the
    /// connection is not reused, and outlier detection counts the failure as Envoy's router
    /// does for any upstream reset.
    pub fn failed(self) {
        if let Some(monitor) = &self.outlier {
            monitor.record_local(LocalResult::ConnectFailed);
        }
    }

    /// The response body has been read to its end: give the connection back to the pool.
    pub fn release(mut self) {
        let Some((mut sender, uses, slot)) = self.http1.take() else { return };
        let limit = self.pool.0.max_requests_per_connection;
        if limit != 0 && uses >= limit {
            // Done with: Envoy closes it as its last response ends and connects for a pending
            // request in the same turn. Its slot goes to the oldest waiting request now, not when
            // the connection's task has wound down: a caller's next request arriving meanwhile
            // would find the pending request still pending and be refused (Istio's circuit-
            // breaking task with two fortio connections: 4 to 7 of 20 got 503, Envoy 0 or 1).
            slot.free();
            return;
        }
        // Usually the connection is ready again by the time its body's end reached us; if not,
        // a small task waits for it rather than losing the connection.
        if sender.is_ready() {
            self.pool.put_idle(sender, uses, slot);
        } else {
            let pool = self.pool.clone();
            tokio::spawn(async move {
                if sender.ready().await.is_ok() {
                    pool.put_idle(sender, uses, slot);
                }
            });
        }
    }

    /// Whether this exchange has an HTTP/1.1 connection to itself.
    pub fn is_http1(&self) -> bool {
        self.http1.is_some()
    }
}

impl Drop for ConnectionLease {
    fn drop(&mut self) {
        self.pool.0.stats.resilience.requests_active.fetch_sub(1, SeqCst);
    }
}

/// A request counted as pending (max_pending_requests) while it waits for a connection.
struct PendingRequest<'a>(&'a AtomicU64);

impl<'a> PendingRequest<'a> {
    fn enter(pool: &'a PoolInner) -> Result<Self, UpstreamError> {
        let counts = &pool.stats.resilience;
        if try_acquire(&counts.requests_pending, pool.breakers.max_pending_requests) {
            Ok(PendingRequest(&counts.requests_pending))
        } else {
            counts.pending_overflows.fetch_add(1, Relaxed);
            Err(UpstreamError::Overflow)
        }
    }
}

impl Drop for PendingRequest<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

/// An HTTP/1.1 request pending (max_pending_requests) until it has a connection, in the
/// endpoint's queue once it has to wait. Given a freed slot (`take_grant`), it stopped being
/// pending at that moment: whoever freed the slot uncounted it. Leaving with a slot it was given
/// but did not use, it passes the slot on.
struct QueuedRequest<'a> {
    pool: &'a Pool,
    /// Made when it first waits: a request that connects at once costs no allocation or lock.
    ticket: Option<Arc<Ticket>>,
    taken: bool,
}

impl<'a> QueuedRequest<'a> {
    fn enter(pool: &'a Pool) -> Result<Self, UpstreamError> {
        std::mem::forget(PendingRequest::enter(&pool.0)?); // uncounted in Drop, or by a grant
        Ok(QueuedRequest { pool, ticket: None, taken: false })
    }

    /// Its ticket, put in line the first time.
    fn wait_in_line(&mut self) -> Arc<Ticket> {
        self.ticket
            .get_or_insert_with(|| {
                let ticket = Arc::new(Ticket::default());
                self.pool.0.queue.lock().unwrap().push_back(ticket.clone());
                ticket
            })
            .clone()
    }

    /// Whether a freed connection slot is now this request's (counted open already).
    fn take_grant(&mut self) -> bool {
        self.taken = self.ticket.as_ref().is_some_and(|ticket| ticket.granted.load(SeqCst));
        self.taken
    }
}

impl Drop for QueuedRequest<'_> {
    fn drop(&mut self) {
        let pool = &self.pool.0;
        let granted = match &self.ticket {
            None => false,
            Some(ticket) => {
                let mut queue = pool.queue.lock().unwrap();
                queue.retain(|waiting| !Arc::ptr_eq(waiting, ticket));
                // Read under the lock grants are made under: granted or not, that is final here.
                ticket.granted.load(SeqCst)
            }
        };
        if !granted {
            pool.stats.resilience.requests_pending.fetch_sub(1, SeqCst);
        } else if !self.taken {
            self.pool.give_or_free_slot();
        }
    }
}

/// One connection counted open (max_connections) from before it is opened until it closes: its
/// task holds it, so a connection the server closes is uncounted too. An HTTP/1.1 connection
/// that will carry no more requests gives its slot up earlier, through a ConnectionSlot.
struct OpenConnection(ConnectionSlot);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.free();
    }
}

/// A connection's place in the counts of open connections; given up once, by whichever comes
/// first: the connection's end, or its last request done (max_requests_per_connection).
#[derive(Clone)]
struct ConnectionSlot {
    pool: Pool,
    counted: Arc<AtomicBool>,
}

impl ConnectionSlot {
    fn free(&self) {
        if self.counted.swap(false, SeqCst) {
            self.pool.give_or_free_slot();
        }
    }
}

/// A request waiting for a connection to come free, counted (so that a freed connection wakes
/// someone only when someone waits) until it stops waiting, timed out or cancelled included.
struct Waiting<'a>(&'a AtomicU64);

impl<'a> Waiting<'a> {
    fn enter(count: &'a AtomicU64) -> Self {
        count.fetch_add(1, SeqCst);
        Waiting(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

/// How a request that found no idle HTTP/1.1 connection got one.
enum Http1Connection {
    Idle(IdleHttp1),
    New(http1::SendRequest<RequestBody>, ConnectionSlot),
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
            breakers: cluster.circuit_breakers.clone(),
            queue_timeout: cluster.queue_timeout,
            open_connections: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
            connection_freed: Notify::new(),
            queue: Mutex::new(VecDeque::new()),
        }))
    }

    /// Send one request. The lease that comes back counts the request as active until the
    /// response body has been read to its end (or dropped); for HTTP/1.1 it also holds the
    /// connection, released to the pool then.
    /// `on_connected` runs once the request has a connection to go out on (Envoy's "pool ready",
    /// which outlier detection counts as a local-origin success), before it is written.
    // `send` and its two protocols return `async move` blocks rather than being `async fn`s, which
    // would keep a second copy of the request in every request's future (see upstream_request.rs).
    pub fn send<'a>(
        &'a self,
        request: Request<RequestBody>,
        on_connected: impl Fn() + 'a,
    ) -> impl Future<Output = Result<(Response<Incoming>, Option<ConnectionLease>), UpstreamError>> + 'a {
        let leased = |(response, lease)| (response, Some(lease));
        match self.0.protocol {
            UpstreamProtocol::Http1 => Either::Left(self.send_http1(request, on_connected).map_ok(leased)),
            UpstreamProtocol::Http2 => Either::Right(self.send_http2(request, on_connected).map_ok(leased)),
        }
    }

    #[allow(clippy::manual_async_fn)] // on purpose: see the comment above `send`
    fn send_http1<'a>(
        &'a self,
        mut request: Request<RequestBody>,
        on_connected: impl Fn() + 'a,
    ) -> impl Future<Output = Result<(Response<Incoming>, ConnectionLease), UpstreamError>> + 'a {
        async move {
            // A pooled connection may have been closed by the server while idle; if the request was
            // not written, hyper hands it back and it is sent again on a fresh connection.
            loop {
                let (mut sender, uses, slot, pooled) = match self.checkout_http1() {
                    Some(idle) => (idle.sender, idle.uses, idle.slot, true),
                    // Boxed: the connect path (TCP, TLS, the pending queue) is a large future, and
                    // kept inline it would be part of, and copied with, every request's future.
                    None => match Box::pin(self.wait_for_http1_within_queue_timeout()).await? {
                        Http1Connection::Idle(idle) => (idle.sender, idle.uses, idle.slot, true),
                        Http1Connection::New(sender, slot) => (sender, 0, slot, false),
                    },
                };
                let mut lease = match self.attach() {
                    Ok(lease) => lease,
                    Err(overflow) => {
                        self.put_idle(sender, uses, slot);
                        return Err(overflow);
                    }
                };
                on_connected();
                match sender.try_send_request(request).await {
                    Ok(response) => {
                        lease.http1 = Some((sender, uses + 1, slot));
                        return Ok((response, lease));
                    }
                    Err(mut error) => match error.take_message() {
                        Some(unsent) if pooled => request = unsent,
                        _ => return Err(UpstreamError::Reset(error.into_error())),
                    },
                }
            }
        }
    }

    /// The request has its connection: count it active (max_requests), as Envoy does when a
    /// stream is attached to a connection. Over the limit it fails (upstream_rq_active_overflow).
    fn attach(&self) -> Result<ConnectionLease, UpstreamError> {
        let counts = &self.0.stats.resilience;
        if try_acquire(&counts.requests_active, self.0.breakers.max_requests) {
            Ok(ConnectionLease { pool: self.clone(), http1: None, outlier: None })
        } else {
            counts.active_overflows.fetch_add(1, Relaxed);
            Err(UpstreamError::Overflow)
        }
    }

    /// `wait_for_http1`, given up after the cluster's queue timeout, if it has one: the request is
    /// refused as a circuit breaker's overflow (503, flag UO) and counted as one.
    async fn wait_for_http1_within_queue_timeout(&self) -> Result<Http1Connection, UpstreamError> {
        let Some(limit) = self.0.queue_timeout else { return self.wait_for_http1().await };
        match tokio::time::timeout(limit, self.wait_for_http1()).await {
            Ok(result) => result,
            Err(_) => {
                self.0.stats.resilience.pending_overflows.fetch_add(1, Relaxed);
                Err(UpstreamError::Overflow)
            }
        }
    }

    /// No idle connection: open one if max_connections allows, else wait, as a pending request,
    /// for one of this endpoint's connections to come free or close (Envoy's pending queue).
    async fn wait_for_http1(&self) -> Result<Http1Connection, UpstreamError> {
        let counts = &self.0.stats.resilience;
        let mut queued = QueuedRequest::enter(self)?;
        let mut overflow_counted = false;
        loop {
            let freed = self.0.connection_freed.notified();
            tokio::pin!(freed);
            // Registered before looking, so a connection freed meanwhile is not missed.
            freed.as_mut().enable();
            let _waiting = Waiting::enter(&self.0.waiting);
            let waited = async {
                if queued.take_grant() {
                    // A freed slot is ours, counted open already: connect on it.
                    let slot = ConnectionSlot { pool: self.clone(), counted: Arc::new(AtomicBool::new(true)) };
                    let open = OpenConnection(slot.clone());
                    return Some(self.connect_http1(open).await.map(|sender| Http1Connection::New(sender, slot)));
                }
                if let Some(idle) = self.checkout_http1() {
                    return Some(Ok(Http1Connection::Idle(idle)));
                }
                let within_limit = try_acquire(&counts.connections_active, self.0.breakers.max_connections);
                if !within_limit && !overflow_counted {
                    counts.connection_overflows.fetch_add(1, Relaxed);
                    overflow_counted = true;
                }
                // As Envoy: an endpoint with no connection gets one even over the limit, or its
                // pending requests could never go.
                if within_limit || self.0.open_connections.load(SeqCst) == 0 {
                    if !within_limit {
                        counts.connections_active.fetch_add(1, SeqCst);
                    }
                    let open = self.open_connection();
                    let slot = open.0.clone();
                    return Some(self.connect_http1(open).await.map(|sender| Http1Connection::New(sender, slot)));
                }
                None
            };
            match waited.await {
                Some(result) => return result,
                None => {
                    // In line from now on: a slot freed from here is handed to the oldest in line;
                    // one freed before, while the queue was empty, wakes `freed`.
                    let ticket = queued.wait_in_line();
                    tokio::select! {
                        _ = &mut freed => {}
                        _ = ticket.wake.notified() => {}
                    }
                }
            }
        }
    }

    /// A connection slot given up: to the oldest waiting HTTP/1.1 request, which stops being
    /// pending now and connects on it (the counts of open connections keep it); with nobody
    /// waiting, uncounted.
    fn give_or_free_slot(&self) {
        let pool = &self.0;
        let mut queue = pool.queue.lock().unwrap();
        if let Some(ticket) = queue.pop_front() {
            ticket.granted.store(true, SeqCst);
            drop(queue);
            pool.stats.resilience.requests_pending.fetch_sub(1, SeqCst);
            ticket.wake.notify_one();
            return;
        }
        drop(queue);
        pool.stats.resilience.connections_active.fetch_sub(1, SeqCst);
        pool.open_connections.fetch_sub(1, SeqCst);
        // A waiting request may now open a connection of its own.
        self.wake_a_waiter();
    }

    /// Count a connection of this endpoint as open (the cluster's count is taken by the caller).
    fn open_connection(&self) -> OpenConnection {
        self.0.open_connections.fetch_add(1, SeqCst);
        OpenConnection(ConnectionSlot { pool: self.clone(), counted: Arc::new(AtomicBool::new(true)) })
    }

    fn wake_a_waiter(&self) {
        if self.0.waiting.load(SeqCst) > 0 {
            self.0.connection_freed.notify_one();
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

    fn put_idle(&self, sender: http1::SendRequest<RequestBody>, uses: u32, slot: ConnectionSlot) {
        let mut idle = self.0.idle_http1.lock().unwrap();
        if idle.len() < MAX_IDLE_HTTP1 {
            idle.push(IdleHttp1 { sender, idle_since: Instant::now(), uses, slot });
        }
        drop(idle);
        self.wake_a_waiter();
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

    async fn connect_http1(&self, open: OpenConnection) -> Result<http1::SendRequest<RequestBody>, UpstreamError> {
        let io = self.connect().await?;
        let (sender, connection) = http1::Builder::new()
            .max_buf_size(self.0.max_response_headers_bytes.max(8192) + 8192)
            .handshake(io)
            .await
            .map_err(UpstreamError::Handshake)?;
        tokio::spawn(async move {
            let _open = open;
            let _ = connection.with_upgrades().await;
        });
        Ok(sender)
    }

    #[allow(clippy::manual_async_fn)] // on purpose: see the comment above `send`
    fn send_http2<'a>(
        &'a self,
        mut request: Request<RequestBody>,
        on_connected: impl Fn() + 'a,
    ) -> impl Future<Output = Result<(Response<Incoming>, ConnectionLease), UpstreamError>> + 'a {
        async move {
            for _ in 0..2 {
                let mut sender = match self.live_http2() {
                    Some(sender) => sender,
                    // Boxed, as wait_for_http1: the connect path stays out of every request's future.
                    None => Box::pin(self.http2_sender()).await?,
                };
                if sender.ready().await.is_err() {
                    self.forget_http2();
                    continue;
                }
                let lease = self.attach()?;
                on_connected();
                match sender.try_send_request(request).await {
                    Ok(response) => return Ok((response, lease)),
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
            let mut sender = Box::pin(self.http2_sender()).await?;
            let lease = self.attach()?;
            on_connected();
            sender.send_request(request).await.map(|response| (response, lease)).map_err(UpstreamError::Reset)
        }
    }

    async fn http2_sender(&self) -> Result<http2::SendRequest<RequestBody>, UpstreamError> {
        if let Some(sender) = self.live_http2() {
            return Ok(sender);
        }
        // Waiting for the connection to open, the request is pending (max_pending_requests).
        let _pending = PendingRequest::enter(&self.0)?;
        let _connecting = self.0.http2_connecting.lock().await;
        if let Some(sender) = self.live_http2() {
            return Ok(sender);
        }
        // meshctl keeps one HTTP/2 connection per endpoint and opens it only when the endpoint has
        // none in use: over max_connections it is counted as an overflow and opened anyway, as
        // Envoy opens a connection for an endpoint that has none.
        let counts = &self.0.stats.resilience;
        if !try_acquire(&counts.connections_active, self.0.breakers.max_connections) {
            counts.connection_overflows.fetch_add(1, Relaxed);
            counts.connections_active.fetch_add(1, SeqCst);
        }
        let open = self.open_connection();
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
        tokio::spawn(async move {
            let _open = open;
            let _ = connection.await;
        });
        *self.0.http2.lock().unwrap() =
            Some(SharedHttp2 { sender: sender.clone(), uses: 1, used: true, idle_since: Instant::now() });
        Ok(sender)
    }

    /// The shared HTTP/2 connection, if open. One that has been given its
    /// max_requests_per_connection is no longer shared: it finishes its streams and closes.
    fn live_http2(&self) -> Option<http2::SendRequest<RequestBody>> {
        let mut shared = self.0.http2.lock().unwrap();
        let connection = shared.as_mut().filter(|c| !c.sender.is_closed())?;
        let limit = self.0.max_requests_per_connection;
        if limit != 0 && connection.uses >= limit {
            *shared = None;
            return None;
        }
        connection.uses += 1;
        connection.used = true;
        Some(connection.sender.clone())
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

    /// Close connections idle past the cluster's idle timeout (common_http_protocol_options).
    pub fn close_expired(&self, now: Instant) {
        let timeout = self.0.idle_timeout;
        self.0.idle_http1.lock().unwrap().retain(|c| c.idle_since.elapsed() < timeout && c.sender.is_ready());
        // The HTTP/2 connection is idle once no request was given it for the idle timeout (to
        // the reaper's second); it then stops being shared and closes when its last stream ends.
        // Envoy times from its last stream's end: a stream lasting longer than the timeout does
        // not keep the connection shared here.
        let mut shared = self.0.http2.lock().unwrap();
        if let Some(connection) = shared.as_mut() {
            if connection.used {
                connection.used = false;
                connection.idle_since = now;
            } else if now.saturating_duration_since(connection.idle_since) >= timeout {
                *shared = None;
            }
        }
    }
}
