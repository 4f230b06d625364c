//! Opaque TCP forwarding to a cluster endpoint: splice(2) between plain sockets, so the bytes
//! never enter user space; a buffered copy where either side is TLS (the cluster's mTLS too).

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::prefixed::PrefixedStream;
use super::tls::{upstream_handshake, UpstreamStream};
use crate::model::TcpProxyConfig;
use crate::registry::Registry;
use crate::upstream::outlier::LocalResult;

async fn connect_upstream(
    config: &TcpProxyConfig,
    registry: &Registry,
    original_destination: Option<SocketAddr>,
) -> Option<(UpstreamStream, impl Drop)> {
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
                    Some((stream, active))
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
async fn bounded<F: std::future::Future>(config: &TcpProxyConfig, copy: F) {
    match config.idle_timeout {
        Some(limit) => {
            let _ = tokio::time::timeout(limit, copy).await;
        }
        None => {
            copy.await;
        }
    }
}

/// A plaintext connection: replay the detection bytes, then splice both directions.
pub async fn proxy_tcp_plain(
    config: &TcpProxyConfig,
    registry: &Registry,
    original_destination: Option<SocketAddr>,
    downstream: PrefixedStream<TcpStream>,
) {
    let Some((upstream, _active)) = connect_upstream(config, registry, original_destination).await else { return };
    let mut upstream = match upstream {
        UpstreamStream::Plain(upstream) => upstream,
        // No splice across TLS: the bytes must pass through rustls.
        mut tls => {
            let mut downstream = downstream;
            bounded(config, tokio::io::copy_bidirectional(&mut downstream, &mut tls)).await;
            return;
        }
    };
    let (prefix, mut downstream) = downstream.into_parts();
    if !prefix.is_empty() && upstream.write_all(&prefix).await.is_err() {
        return;
    }
    bounded(config, tokio_splice2::copy_bidirectional(&mut downstream, &mut upstream)).await;
}

/// Any other stream (e.g. TLS terminated here): a buffered bidirectional copy.
pub async fn proxy_tcp<S>(config: &TcpProxyConfig, registry: &Registry, original_destination: Option<SocketAddr>, mut downstream: S)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Some((mut upstream, _active)) = connect_upstream(config, registry, original_destination).await else { return };
    bounded(config, tokio::io::copy_bidirectional(&mut downstream, &mut upstream)).await;
}
