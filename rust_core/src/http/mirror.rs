//! Request mirroring (Envoy's request_mirror_policies): a fire-and-forget copy of a routed request
//! (and of its body, up to the route's buffer limit) to another cluster, its host marked
//! "-shadow", its answer read and thrown away. The copy never delays or fails the request it copies.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::body::ResponseBody;
use super::proxy::{upstream_uri, HttpContext};
use super::request_body::{BodyTee, CopiedBody, RequestBody};
use crate::model::fault::MirrorPolicy;
use crate::model::UpstreamProtocol;
use crate::upstream::ClusterRuntime;

/// Copies in flight across the process: beyond this a copy is not sent (and counted), so a slow
/// mirror cannot make copies, and the request bodies they keep, pile up in memory.
const MAX_IN_FLIGHT: usize = 256;
/// A copy waits for its answer at most this long when its route has no timeout.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);

static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// A copy on its way: its cluster, its head, and its place among the copies in flight.
struct Copy {
    cluster: Arc<ClusterRuntime>,
    head: Request<()>,
    _slot: InFlight,
}

/// Sends a copy of `request` (already rewritten for its upstream; `host` is its Host) to each
/// policy's cluster that draws it. A request without a body is copied at once; for one with a
/// body the returned tee keeps the body (up to `body_limit`) as the request sends it, and the
/// copies go when it has ended. A longer body, or one that fails, is not mirrored (counted).
pub fn mirror(
    context: &Arc<HttpContext>,
    policies: &[MirrorPolicy],
    request: &Request<Incoming>,
    host: &str,
    timeout: Option<Duration>,
    body_limit: usize,
) -> Option<Box<BodyTee>> {
    let mut copies = Vec::new();
    for policy in policies {
        if !policy.share.sample() {
            continue;
        }
        let Some(cluster) = context.registry.cluster(&policy.cluster) else { continue };
        let Some(slot) = InFlight::take() else {
            cluster.stats.resilience.shadows_abandoned.fetch_add(1, Relaxed);
            continue;
        };
        if let Some(head) = copy_of(&cluster, policy, request, host) {
            copies.push(Copy { cluster, head, _slot: slot });
        }
    }
    if copies.is_empty() {
        return None;
    }
    let timeout = timeout.unwrap_or(DEFAULT_TIMEOUT);
    if http_body::Body::is_end_stream(request.body()) {
        for copy in copies {
            let context = context.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(timeout, send(&context, copy, CopiedBody::default())).await;
            });
        }
        return None;
    }
    let (done, body) = oneshot::channel::<CopiedBody>();
    let context = context.clone();
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + timeout;
        // No whole body in time (too long, failed, or too slow): the copies are abandoned.
        let Ok(Ok(whole)) = tokio::time::timeout_at(deadline, body).await else {
            for copy in &copies {
                copy.cluster.stats.resilience.shadows_abandoned.fetch_add(1, Relaxed);
            }
            return;
        };
        let sends = copies.into_iter().map(|copy| send(&context, copy, whole.clone()));
        let _ = tokio::time::timeout_at(deadline, futures_util::future::join_all(sends)).await;
    });
    Some(BodyTee::new(body_limit, http_body::Body::size_hint(request.body()).exact(), done))
}

fn copy_of(cluster: &ClusterRuntime, policy: &MirrorPolicy, request: &Request<Incoming>, host: &str) -> Option<Request<()>> {
    let host = if policy.shadow_host_suffix { shadow_host(host) } else { host.to_string() };
    let path = request.uri().path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
    let http2 = cluster.config.protocol == UpstreamProtocol::Http2;
    let mut copy = Request::new(());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = upstream_uri(&host, path, http2, cluster.config.tls.is_some())?;
    *copy.headers_mut() = request.headers().clone();
    if http2 {
        copy.headers_mut().remove(header::HOST);
        *copy.version_mut() = Version::HTTP_2;
    } else {
        copy.headers_mut().insert(header::HOST, HeaderValue::from_str(&host).ok()?);
        *copy.version_mut() = Version::HTTP_11;
    }
    Some(copy)
}

/// Envoy's shadow host: "-shadow" after the host name, before any port.
fn shadow_host(host: &str) -> String {
    match host.rsplit_once(':') {
        Some((name, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) && !name.ends_with(':') => {
            format!("{name}-shadow:{port}")
        }
        _ => format!("{host}-shadow"),
    }
}

/// One try, counted as the cluster's request; its answer is read to the end (so its connection
/// can serve again) and dropped.
async fn send(context: &Arc<HttpContext>, copy: Copy, body: CopiedBody) {
    let Copy { cluster, head, _slot } = copy;
    let (parts, ()) = head.into_parts();
    let request = Request::from_parts(parts, RequestBody::copied(body, context.clone()));
    cluster.stats.requests_total.fetch_add(1, Relaxed);
    let Some(endpoint) = cluster.pick_endpoint(context.original_destination) else {
        cluster.stats.responses.record(503);
        return;
    };
    let active = endpoint.start_request();
    let started = std::time::Instant::now();
    let sent = endpoint.send(request).await;
    drop(active);
    match sent {
        Ok((response, lease)) => {
            cluster.stats.latency.record(started.elapsed());
            cluster.stats.responses.record(response.status().as_u16());
            let mut body = ResponseBody::Upstream(response.into_body(), lease);
            while let Some(Ok(_)) = body.frame().await {}
        }
        Err(_) => cluster.stats.responses.record(503),
    }
}

/// A place among the copies in flight, given back when the copy is done.
struct InFlight;

impl InFlight {
    fn take() -> Option<InFlight> {
        IN_FLIGHT.fetch_update(Relaxed, Relaxed, |n| (n < MAX_IN_FLIGHT).then_some(n + 1)).ok().map(|_| InFlight)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::shadow_host;

    #[test]
    fn shadow_suffix_goes_before_the_port() {
        assert_eq!(shadow_host("ratings"), "ratings-shadow");
        assert_eq!(shadow_host("ratings.default:9080"), "ratings.default-shadow:9080");
    }
}
