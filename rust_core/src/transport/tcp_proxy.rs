//! Opaque TCP forwarding to a cluster endpoint: splice(2) between plain sockets, so the bytes
//! never enter user space; a buffered copy where either side is TLS (the cluster's mTLS too).

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::prefixed::PrefixedStream;
use super::tls::{upstream_handshake, UpstreamStream};
use crate::model::tls::PeerIdentity;
use crate::model::workload::{Reporter, ServiceMetadata, WorkloadMetadata};
use crate::model::TcpProxyConfig;
use crate::registry::Registry;
use crate::telemetry::access_log::ResponseFlags;
use crate::telemetry::istio_metrics::{Protocol, SecurityPolicy, SeriesKey, TcpSample};
use crate::upstream::outlier::LocalResult;
use crate::upstream::{ClusterRuntime, Endpoint};

/// Istio's TCP series of one proxied connection; None when the listener reports none. A source
/// names the endpoint's workload (EDS metadata); a destination knows its TLS peer by its SPIFFE
/// ID alone (TCP carries no mesh header).
fn istio_key(config: &TcpProxyConfig, cluster: &ClusterRuntime, endpoint: &Endpoint, peer: Option<&PeerIdentity>) -> Option<SeriesKey> {
    let istio = config.istio.as_ref()?;
    let (source, destination, service, security) = match istio.reporter {
        Reporter::Source => (
            istio.workload.clone(),
            endpoint.workload.clone().unwrap_or_else(WorkloadMetadata::unknown),
            cluster.config.service.clone().unwrap_or_else(ServiceMetadata::unknown),
            SecurityPolicy::Unknown,
        ),
        Reporter::Destination => (
            peer.map_or_else(WorkloadMetadata::unknown, |p| std::sync::Arc::new(WorkloadMetadata::from_principal(&p.principal))),
            istio.workload.clone(),
            istio.service.clone(),
            if peer.is_some() { SecurityPolicy::MutualTls } else { SecurityPolicy::None },
        ),
    };
    Some(SeriesKey {
        reporter: istio.reporter,
        source,
        destination,
        service,
        protocol: Protocol::Tcp,
        response_code: 0,
        grpc_status: None,
        flags: ResponseFlags::default(),
        security,
    })
}

/// Counts a connection opened now, and closed (with its bytes) when dropped.
struct TcpReport {
    key: SeriesKey,
    metrics: std::sync::Arc<crate::telemetry::istio_metrics::IstioMetrics>,
    /// Bytes from the downstream (received) and to it (sent), once known.
    received: u64,
    sent: u64,
}

impl TcpReport {
    fn open(config: &TcpProxyConfig, cluster: &ClusterRuntime, endpoint: &Endpoint, peer: Option<&PeerIdentity>) -> Option<TcpReport> {
        let key = istio_key(config, cluster, endpoint, peer)?;
        let metrics = config.istio.as_ref()?.metrics.clone();
        metrics.record_tcp(&key, TcpSample { opened: 1, ..Default::default() });
        Some(TcpReport { key, metrics, received: 0, sent: 0 })
    }
}

impl Drop for TcpReport {
    fn drop(&mut self) {
        self.metrics.record_tcp(&self.key, TcpSample { received_bytes: self.received, sent_bytes: self.sent, closed: 1, opened: 0 });
    }
}

async fn connect_upstream(
    config: &TcpProxyConfig,
    registry: &Registry,
    original_destination: Option<SocketAddr>,
    peer: Option<&PeerIdentity>,
) -> Option<(UpstreamStream, impl Drop, Option<TcpReport>)> {
    let cluster = registry.cluster(&config.cluster)?;
    let endpoint = cluster.pick_endpoint(original_destination)?;
    let active = endpoint.start_request();
    cluster.stats.connections_total.fetch_add(1, Relaxed);
    // Outlier detection sees the connection as the whole exchange, as Envoy's TCP proxy reports it.
    match tokio::time::timeout(cluster.config.connect_timeout, TcpStream::connect(endpoint.address)).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            let handshake = upstream_handshake(stream, cluster.config.tls.as_deref(), endpoint.address, &cluster.tls_stats);
            match tokio::time::timeout(cluster.config.connect_timeout, handshake).await {
                Ok(Ok(stream)) => {
                    endpoint.record_connect(Ok(()));
                    let report = TcpReport::open(config, &cluster, &endpoint, peer);
                    Some((stream, active, report))
                }
                outcome => {
                    cluster.stats.connect_failures.fetch_add(1, Relaxed);
                    endpoint.record_connect(Err(if outcome.is_err() { LocalResult::Timeout } else { LocalResult::ConnectFailed }));
                    None
                }
            }
        }
        outcome => {
            cluster.stats.connect_failures.fetch_add(1, Relaxed);
            endpoint.record_connect(Err(if outcome.is_err() { LocalResult::Timeout } else { LocalResult::ConnectFailed }));
            None
        }
    }
}

/// Bound a proxied connection's lifetime by the proxy's idle timeout (a coarse stand-in until
/// per-read idle timers land).
/// None: the timeout ended it (the bytes it copied are not known then).
async fn bounded<F: std::future::Future>(config: &TcpProxyConfig, copy: F) -> Option<F::Output> {
    match config.idle_timeout {
        Some(limit) => tokio::time::timeout(limit, copy).await.ok(),
        None => Some(copy.await),
    }
}

/// The bytes of a finished buffered copy (downstream → upstream, upstream → downstream).
fn copied(report: &mut Option<TcpReport>, outcome: Option<std::io::Result<(u64, u64)>>) {
    if let (Some(report), Some(Ok((received, sent)))) = (report, outcome) {
        report.received = received;
        report.sent = sent;
    }
}

/// A plaintext connection: replay the detection bytes, then splice both directions.
pub async fn proxy_tcp_plain(
    config: &TcpProxyConfig,
    registry: &Registry,
    original_destination: Option<SocketAddr>,
    downstream: PrefixedStream<TcpStream>,
) {
    let Some((upstream, _active, mut report)) = connect_upstream(config, registry, original_destination, None).await else { return };
    let mut upstream = match upstream {
        UpstreamStream::Plain(upstream) => upstream,
        // No splice across TLS: the bytes must pass through rustls.
        mut tls => {
            let mut downstream = downstream;
            let outcome = bounded(config, tokio::io::copy_bidirectional(&mut downstream, &mut tls)).await;
            copied(&mut report, outcome);
            return;
        }
    };
    let (prefix, mut downstream) = downstream.into_parts();
    if !prefix.is_empty() && upstream.write_all(&prefix).await.is_err() {
        return;
    }
    let outcome = bounded(config, tokio_splice2::copy_bidirectional(&mut downstream, &mut upstream)).await;
    // splice(2) reports what it moved even when the connection ended in an error.
    if let (Some(report), Some(Ok(traffic))) = (report.as_mut(), outcome) {
        report.received = prefix.len() as u64 + traffic.tx as u64;
        report.sent = traffic.rx as u64;
    }
}

/// Any other stream (e.g. TLS terminated here): a buffered bidirectional copy.
/// `peer`: the client's verified identity when it connected with mTLS.
pub async fn proxy_tcp<S>(
    config: &TcpProxyConfig,
    registry: &Registry,
    original_destination: Option<SocketAddr>,
    peer: Option<&PeerIdentity>,
    mut downstream: S,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Some((mut upstream, _active, mut report)) = connect_upstream(config, registry, original_destination, peer).await else { return };
    let outcome = bounded(config, tokio::io::copy_bidirectional(&mut downstream, &mut upstream)).await;
    copied(&mut report, outcome);
}
