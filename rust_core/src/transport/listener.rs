//! A bound listener: accepts connections, detects their protocol, picks a filter chain, and hands
//! the connection to TLS, HTTP or TCP proxying. Its config can be swapped while it runs.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};

use super::chain::{select_chain, ConnectionFacts};
use super::detect::{classify, Detection};
use super::prefixed::PrefixedStream;
use super::tcp_proxy::{proxy_tcp, proxy_tcp_plain};
use super::tls::{failure_reason, peer_identity};
use crate::http::proxy::HttpContext;
use crate::http::server::serve_http;
use crate::model::listener::HttpCodec;
use crate::model::{FilterChainConfig, ListenerConfig, NetworkHandler};
use crate::registry::Registry;
use crate::model::tls::PeerIdentity;
use crate::telemetry::metrics::{ListenerStats, Metrics, TlsDirection};

/// Bytes read at most while detecting (a ClientHello or request line fits comfortably).
const DETECTION_BUFFER: usize = 4096;

/// Counts live connections so drain can wait for the last one.
#[derive(Default)]
pub struct ConnectionTracker {
    active: AtomicUsize,
    idle: Notify,
}

impl ConnectionTracker {
    fn enter(self: &Arc<Self>) -> ConnectionGuard {
        self.active.fetch_add(1, Relaxed);
        ConnectionGuard(self.clone())
    }

    pub fn active(&self) -> usize {
        self.active.load(Relaxed)
    }

    /// Wait until no connection is left.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.active() == 0 {
                return;
            }
            notified.await;
        }
    }
}

struct ConnectionGuard(Arc<ConnectionTracker>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Relaxed) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// A running listener, owned by the engine.
pub struct ListenerHandle {
    pub config: Arc<ArcSwap<ListenerConfig>>,
    pub local_address: SocketAddr,
    pub connections: Arc<ConnectionTracker>,
    stop_accepting: watch::Sender<bool>,
    /// Fires for the connections accepted since it was made: they finish what is in flight and
    /// close (GOAWAY / Connection: close). Replaced by a fresh one each time it fires for a
    /// config change, so later connections are not drained with them.
    connection_drain: Arc<ArcSwap<watch::Sender<bool>>>,
}

impl ListenerHandle {
    /// Swap in a new config for the same address: new connections use it; open ones keep theirs
    /// until `drain_open_connections`.
    pub fn update(&self, config: Arc<ListenerConfig>) {
        self.config.store(config);
    }

    /// Ask the connections open now to finish and close, while the listener keeps accepting:
    /// their clients reconnect and get the current config. Used when a config change must reach
    /// long-lived (multiplexed) connections too: authorization policy, trust roots, revocations.
    pub fn drain_open_connections(&self) {
        let (fresh, _) = watch::channel(false);
        let previous = self.connection_drain.swap(Arc::new(fresh));
        previous.send_replace(true);
    }

    /// Stop accepting and ask open connections to finish (GOAWAY / Connection: close).
    pub fn drain(&self) {
        let _ = self.stop_accepting.send(true);
        self.connection_drain.load().send_replace(true);
    }
}

/// Bind the listener's socket now, so an address in use is reported before anything changes.
pub fn bind(address: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(address), socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

pub struct ListenerDeps {
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
}

/// Start accepting on an already bound socket. Must be called inside the engine's runtime.
pub fn spawn(socket: std::net::TcpListener, config: Arc<ListenerConfig>, deps: Arc<ListenerDeps>) -> std::io::Result<ListenerHandle> {
    let local_address = socket.local_addr()?;
    let listener = TcpListener::from_std(socket)?;
    let (stop_accepting, mut stop_rx) = watch::channel(false);
    let (connection_drain, _) = watch::channel(false);
    let handle = ListenerHandle {
        config: Arc::new(ArcSwap::new(config)),
        local_address,
        connections: Arc::new(ConnectionTracker::default()),
        stop_accepting,
        connection_drain: Arc::new(ArcSwap::from_pointee(connection_drain)),
    };
    let shared_config = handle.config.clone();
    let shared_drain = handle.connection_drain.clone();
    let tracker = handle.connections.clone();
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = stop_rx.wait_for(|stop| *stop) => break,
            };
            let (stream, peer) = match accepted {
                Ok(connection) => connection,
                // Out of descriptors and similar: back off briefly rather than spin.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            // Subscribe before reading the config: a change in between then drains this
            // connection too, rather than leaving it on the old config for good.
            let drain = shared_drain.load().subscribe();
            let mut config = shared_config.load_full();
            let mut connection = Connection { peer, local: local_address, original_destination: None };
            if config.use_original_dst {
                // A connection redirected here by iptables goes to the listener for the address
                // it was really going to, when there is one (Envoy's use_original_dst).
                connection.original_destination = original_destination(&stream).filter(|d| *d != local_address);
                if let Some(handed_over) = connection.original_destination.and_then(|d| deps.registry.listener_for(d)) {
                    config = handed_over;
                }
            }
            let stats = deps.metrics.listener(&config.name);
            let guard = tracker.enter();
            let deps = deps.clone();
            tokio::spawn(async move {
                let _guard = guard;
                stats.connections_total.fetch_add(1, Relaxed);
                stats.connections_active.fetch_add(1, Relaxed);
                handle_connection(stream, connection, &config, &deps, stats.clone(), drain).await;
                stats.connections_active.fetch_sub(1, Relaxed);
            });
        }
        // Dropping the listener closes the socket: new connections are refused from here on.
    });
    Ok(handle)
}

/// Addresses of one downstream connection.
#[derive(Clone, Copy)]
struct Connection {
    peer: SocketAddr,
    local: SocketAddr,
    /// Where the client was going before a REDIRECT rule sent it here.
    original_destination: Option<SocketAddr>,
}

impl Connection {
    fn destination(&self) -> SocketAddr {
        self.original_destination.unwrap_or(self.local)
    }
}

/// SO_ORIGINAL_DST (IPv4) or IP6T_SO_ORIGINAL_DST (IPv6); None when the connection was not
/// redirected or the platform cannot tell.
fn original_destination(stream: &TcpStream) -> Option<SocketAddr> {
    let socket = socket2::SockRef::from(stream);
    let address = match stream.local_addr().ok()? {
        SocketAddr::V4(_) => socket.original_dst().ok()?,
        SocketAddr::V6(_) => socket.original_dst_ipv6().ok()?,
    };
    address.as_socket()
}

async fn handle_connection(
    mut stream: TcpStream,
    connection: Connection,
    config: &ListenerConfig,
    deps: &Arc<ListenerDeps>,
    stats: Arc<ListenerStats>,
    drain: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let mut prefix = BytesMut::with_capacity(if config.needs_detection { 1024 } else { 0 });
    let detection = if config.needs_detection {
        match detect(&mut stream, &mut prefix, config.detection_timeout).await {
            Some(Detection::NeedMore) if !config.continue_on_detection_timeout => return,
            Some(detection) => detection,
            None => return,
        }
    } else {
        Detection::Other
    };
    if matches!(detection, Detection::NeedMore | Detection::Other) && config.needs_detection {
        stats.detection_fallbacks.fetch_add(1, Relaxed);
    }
    let stream = PrefixedStream::new(prefix, stream);
    if detection == Detection::Tls && has_tls_chain(config) {
        serve_tls(stream, connection, config, deps, stats, drain).await;
        return;
    }
    let application_protocols: Vec<String> = match detection {
        Detection::Http1 => vec!["http/1.1".into()],
        Detection::Http2 => vec!["h2c".into()],
        _ => vec![],
    };
    let facts = ConnectionFacts {
        transport_protocol: if detection == Detection::Tls { "tls" } else { "raw_buffer" },
        application_protocols: &application_protocols,
        server_name: None,
        destination_port: connection.destination().port(),
    };
    let Some(chain) = select_chain(config, &facts) else { return };
    if let NetworkHandler::TcpProxy(proxy) = &chain.handler {
        proxy_tcp_plain(proxy, &deps.registry, connection.original_destination, stream).await;
        return;
    }
    let http2 = detection == Detection::Http2;
    dispatch(chain, stream, http2, "http", connection, ConnectionIdentity::default(), deps, stats, drain).await;
}

/// Read until the bytes classify, the buffer is full, or the wait runs out. None: the peer left.
async fn detect(stream: &mut TcpStream, buffer: &mut BytesMut, wait: Duration) -> Option<Detection> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let detection = classify(buffer);
        if detection != Detection::NeedMore || buffer.len() >= DETECTION_BUFFER {
            return Some(if detection == Detection::NeedMore { Detection::Other } else { detection });
        }
        buffer.reserve(1024);
        match tokio::time::timeout_at(deadline, stream.read_buf(buffer)).await {
            Ok(Ok(0)) => return if buffer.is_empty() { None } else { Some(Detection::Other) },
            Ok(Ok(_)) => continue,
            Ok(Err(_)) => return None,
            Err(_) => return Some(if buffer.is_empty() { Detection::NeedMore } else { Detection::Other }),
        }
    }
}

fn has_tls_chain(config: &ListenerConfig) -> bool {
    config.filter_chains.iter().chain(config.default_filter_chain.iter()).any(|c| c.tls.is_some())
}

async fn serve_tls(
    stream: PrefixedStream<TcpStream>,
    connection: Connection,
    config: &ListenerConfig,
    deps: &Arc<ListenerDeps>,
    stats: Arc<ListenerStats>,
    drain: watch::Receiver<bool>,
) {
    let acceptor = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream);
    let Ok(Ok(start)) = tokio::time::timeout(Duration::from_secs(10), acceptor).await else { return };
    let hello = start.client_hello();
    let server_name = hello.server_name().map(str::to_string);
    let offered: Vec<String> = hello
        .alpn()
        .map(|protocols| protocols.map(|p| String::from_utf8_lossy(p).into_owned()).collect())
        .unwrap_or_default();
    let facts = ConnectionFacts {
        transport_protocol: "tls",
        application_protocols: &offered,
        server_name: server_name.as_deref(),
        destination_port: connection.destination().port(),
    };
    let Some(chain) = select_chain(config, &facts) else { return };
    // The ClientHello is consumed; a chain without TLS termination cannot be served from here.
    let Some(tls) = &chain.tls else { return };
    let tls_stats = &deps.metrics.tls;
    // Like Envoy while a secret is warming: no certificate yet, no handshake.
    if tls.certificate.certificate().is_none() {
        tls_stats.handshake_error(TlsDirection::Downstream, "secret_not_ready");
        return;
    }
    let tls_stream = match tokio::time::timeout(Duration::from_secs(10), start.into_stream(tls.config.clone())).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            tls_stats.handshake_error(TlsDirection::Downstream, failure_reason(&error));
            return;
        }
        Err(_) => {
            tls_stats.handshake_error(TlsDirection::Downstream, "timeout");
            return;
        }
    };
    tls_stats.handshake(TlsDirection::Downstream);
    let session = tls_stream.get_ref().1;
    let http2 = session.alpn_protocol() == Some(b"h2");
    let identity = ConnectionIdentity {
        peer: peer_identity(session).map(Arc::new),
        // The server's own SPIFFE ID (XFCC's By=), from the certificate current at this handshake.
        local_principal: tls.certificate.certificate().and_then(|c| c.spiffe_id.clone()),
        server_name,
    };
    dispatch(chain, tls_stream, http2, "https", connection, identity, deps, stats, drain).await;
}

/// Who the two ends of a TLS connection are; empty for plaintext.
#[derive(Default)]
struct ConnectionIdentity {
    peer: Option<Arc<PeerIdentity>>,
    local_principal: Option<String>,
    /// The SNI the client sent (access logs' %REQUESTED_SERVER_NAME%).
    server_name: Option<String>,
}

#[allow(clippy::too_many_arguments)]
async fn dispatch<S>(
    chain: &FilterChainConfig,
    stream: S,
    detected_http2: bool,
    scheme: &'static str,
    connection: Connection,
    identity: ConnectionIdentity,
    deps: &Arc<ListenerDeps>,
    stats: Arc<ListenerStats>,
    drain: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    match &chain.handler {
        NetworkHandler::Http(settings) => {
            let http2 = match settings.codec {
                HttpCodec::Auto => detected_http2,
                HttpCodec::Http1 => false,
                HttpCodec::Http2 => true,
            };
            let context = Arc::new(HttpContext {
                settings: settings.clone(),
                registry: deps.registry.clone(),
                stats,
                scheme,
                peer: connection.peer,
                original_destination: connection.original_destination,
                destination_port: connection.destination().port(),
                peer_requests: identity.peer.as_ref().map(|p| deps.metrics.tls.peer_requests(&p.principal)),
                peer_identity: identity.peer,
                local_principal: identity.local_principal,
                requested_server_name: identity.server_name,
                body_faults: Default::default(),
                rate_limiters: Default::default(),
                istio_peer: Default::default(),
            });
            serve_http(stream, http2, context, drain).await;
        }
        NetworkHandler::TcpProxy(proxy) => {
            proxy_tcp(proxy, &deps.registry, connection.original_destination, identity.peer.as_deref(), stream).await
        }
    }
}
