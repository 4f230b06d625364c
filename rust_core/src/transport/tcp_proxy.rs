//! Opaque TCP forwarding to a cluster endpoint (the downstream stream replays detection bytes).

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::model::TcpProxyConfig;
use crate::registry::Registry;

pub async fn proxy_tcp<S>(config: &TcpProxyConfig, registry: &Registry, mut downstream: S)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Some(cluster) = registry.cluster(&config.cluster) else { return };
    let Some(endpoint) = cluster.pick_endpoint() else { return };
    let _active = endpoint.start_request();
    cluster.stats.connections_total.fetch_add(1, Relaxed);
    let connect = tokio::time::timeout(cluster.config.connect_timeout, TcpStream::connect(endpoint.address)).await;
    let mut upstream = match connect {
        Ok(Ok(stream)) => stream,
        _ => {
            cluster.stats.connect_failures.fetch_add(1, Relaxed);
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let copy = tokio::io::copy_bidirectional(&mut downstream, &mut upstream);
    match config.idle_timeout {
        // The whole-connection bound stands in for an idle timer until per-read timers land.
        Some(limit) => {
            let _ = tokio::time::timeout(limit.max(Duration::from_secs(1)), copy).await;
        }
        None => {
            let _ = copy.await;
        }
    }
}
