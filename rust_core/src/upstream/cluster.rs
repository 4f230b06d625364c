//! A cluster at run time: its config, current endpoints (each with a pool) and statistics.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;
use futures_util::FutureExt;

use hyper::body::Incoming;
use hyper::{Request, Response};

use super::fallback::ClusterFallback;
use super::lb::EndpointSet;
use super::outlier::{self, HostMonitor, LocalResult, OutlierDetector};
use super::pool::{ConnectionLease, Pool, UpstreamError};
use crate::http::request_body::RequestBody;
use crate::model::cluster::HealthStatus;
use crate::model::{ClusterConfig, EndpointConfig, EndpointSource};
use crate::telemetry::metrics::{ClusterStats, Metrics, OutlierStats, TlsStats};

#[derive(Debug)]
pub struct Endpoint {
    pub address: SocketAddr,
    pub weight: u32,
    pub labels: std::collections::BTreeMap<String, String>,
    /// The workload behind it, as the control plane described it; None: unknown.
    pub workload: Option<Arc<crate::model::workload::WorkloadMetadata>>,
    /// As EDS assigned it; ejection by outlier detection is apart, in `outlier`.
    pub health_status: HealthStatus,
    active_requests: AtomicUsize,
    pub pool: Pool,
    /// None when the cluster has no outlier detection: sending then records nothing.
    outlier: Option<Arc<HostMonitor>>,
}

impl Endpoint {
    pub fn active_requests(&self) -> usize {
        self.active_requests.load(Relaxed)
    }

    /// Neither unhealthy by EDS nor ejected by outlier detection.
    pub fn is_healthy(&self) -> bool {
        self.health_status == HealthStatus::Healthy && !self.is_ejected()
    }

    pub fn is_ejected(&self) -> bool {
        self.outlier.as_ref().is_some_and(|m| m.is_ejected())
    }

    pub(crate) fn monitor(&self) -> Option<&Arc<HostMonitor>> {
        self.outlier.as_ref()
    }

    /// Send one request to this endpoint; outlier detection records the response's status here.
    /// A failure is recorded by the caller (`record_failure`), once it knows the client's own
    /// broken request body was not the cause.
    /// Not an `async fn`: the outlier bookkeeping wraps the pool's future instead of adding a
    /// future of its own around it (and a copy of the request) to every request's.
    pub fn send(
        &self,
        request: Request<RequestBody>,
    ) -> impl Future<Output = Result<(Response<Incoming>, Option<ConnectionLease>), UpstreamError>> + '_ {
        let monitor = self.outlier.as_ref();
        // Envoy reads a gRPC status from the response head of gRPC requests only.
        let grpc = monitor.is_some() && is_grpc(request.headers());
        let on_connected = move || {
            if let Some(monitor) = monitor {
                monitor.record_local(LocalResult::ConnectSuccess);
            }
        };
        self.pool.send(request, on_connected).map(move |mut result| {
            if let (Some(monitor), Ok((response, lease))) = (monitor, &mut result) {
                // A reset while the body streams counts too (the lease sees it).
                if let Some(lease) = lease {
                    lease.outlier = Some(monitor.clone());
                }
                let grpc_status = if grpc { response.headers().get("grpc-status") } else { None };
                match grpc_status {
                    Some(status) => monitor.record_status(outlier::grpc_status_to_http(status.as_bytes())),
                    None => monitor.record_status(response.status().as_u16()),
                }
            }
            result
        })
    }

    /// An exchange with this endpoint failed (not because of the client): outlier detection
    /// counts it.
    pub fn record_failure(&self, error: &UpstreamError) {
        let Some(monitor) = &self.outlier else { return };
        match error {
            // An open circuit breaker is the cluster's state, not this endpoint's: Envoy ignores
            // it too (envoyproxy/envoy#25487).
            UpstreamError::Overflow => {}
            // Envoy's router reports every other pool failure and every reset alike (a connect
            // timeout included) as a failed connection.
            _ => monitor.record_local(LocalResult::ConnectFailed),
        }
    }

    /// A try that gave up waiting for this endpoint's response (a per-try or route timeout):
    /// outlier detection counts it as the endpoint's failure.
    pub fn record_timeout(&self) {
        if let Some(monitor) = &self.outlier {
            monitor.record_timeout();
        }
    }

    /// How a connection made for a TCP proxy went (its whole exchange, for outlier detection).
    pub fn record_connect(&self, connected: Result<(), LocalResult>) {
        if let Some(monitor) = &self.outlier {
            monitor.record_local(match connected {
                Ok(()) => LocalResult::ConnectSuccessFinal,
                Err(failure) => failure,
            });
        }
    }

    /// Count a request as active until the guard is dropped (least-request balancing reads it).
    pub fn start_request(self: &Arc<Self>) -> ActiveRequest {
        self.active_requests.fetch_add(1, Relaxed);
        ActiveRequest(self.clone())
    }
}

/// Exactly `application/grpc` or `application/grpc+...` (not gRPC-Web), as Envoy decides.
fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers.get(http::header::CONTENT_TYPE).is_some_and(|v| {
        let v = v.as_bytes();
        v.starts_with(b"application/grpc") && (v.len() == 16 || v[16] == b'+')
    })
}

pub struct ActiveRequest(Arc<Endpoint>);

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        self.0.active_requests.fetch_sub(1, Relaxed);
    }
}

/// Upper bound on distinct original destinations an ORIGINAL_DST cluster keeps pools for.
const MAX_ORIGINAL_DESTINATIONS: usize = 4096;

#[derive(Debug)]
pub struct ClusterRuntime {
    pub config: ClusterConfig,
    pub stats: Arc<ClusterStats>,
    /// Ejections, panic-mode picks and picks that found no endpoint.
    pub outlier_stats: Arc<OutlierStats>,
    /// The engine's TLS counters: pools and TCP proxies count upstream handshakes there.
    pub tls_stats: Arc<TlsStats>,
    /// Shared with the outlier detector, which rebuilds it when an endpoint's health changes.
    endpoints: Arc<ArcSwap<EndpointSet>>,
    rotation: AtomicUsize,
    /// ORIGINAL_DST clusters: one endpoint (and pool) per destination seen.
    original_destinations: Mutex<HashMap<SocketAddr, Arc<Endpoint>>>,
    outlier_detector: Option<Arc<OutlierDetector>>,
    /// meshctl's Fallback for this cluster, with its breaker's state.
    pub fallback: Option<ClusterFallback>,
}

impl ClusterRuntime {
    /// With outlier detection configured, the caller runs `sweeps()` on the engine's runtime.
    pub fn new(config: ClusterConfig, endpoints: &[EndpointConfig], metrics: &Metrics) -> Arc<Self> {
        let outlier_stats = metrics.outlier(&config.name);
        let endpoint_set = Arc::new(ArcSwap::from_pointee(EndpointSet::default()));
        let outlier_detector = config.outlier_detection.clone().map(|detection| {
            OutlierDetector::new(
                detection,
                outlier_stats.clone(),
                endpoint_set.clone(),
                config.healthy_panic_threshold,
                config.update_merge_window,
            )
        });
        if outlier_detector.is_none() {
            outlier_stats.configured.store(false, Relaxed);
        }
        let fallback = config.fallback.clone().map(|fallback| ClusterFallback::new(fallback, &config.name, metrics));
        let runtime = Arc::new(ClusterRuntime {
            fallback,
            stats: metrics.cluster(&config.name),
            outlier_stats,
            tls_stats: metrics.tls.clone(),
            config,
            endpoints: endpoint_set,
            rotation: AtomicUsize::new(fastrand::usize(..1024)),
            original_destinations: Mutex::new(HashMap::new()),
            outlier_detector,
        });
        runtime.replace_endpoints(endpoints, true);
        runtime
    }

    /// The outlier detector's interval sweeps, to run until this cluster is gone; None without
    /// outlier detection.
    pub fn sweeps(&self) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        let detector = self.outlier_detector.as_ref()?;
        Some(outlier::run_sweeps(Arc::downgrade(detector), detector.interval()))
    }

    /// Replace the endpoint set; endpoints that stay keep their pooled connections and their
    /// outlier detection state.
    pub fn set_endpoints(&self, configs: &[EndpointConfig]) {
        self.replace_endpoints(configs, false);
    }

    /// `initial`: the cluster's first endpoints, which (as in Envoy) start no merge window.
    fn replace_endpoints(&self, configs: &[EndpointConfig], initial: bool) {
        let mut publishing = self.outlier_detector.as_ref().map(|d| d.lock());
        let current = self.endpoints.load();
        let by_address: HashMap<SocketAddr, &Arc<Endpoint>> =
            current.endpoints.iter().map(|e| (e.address, e)).collect();
        let endpoints = configs
            .iter()
            .map(|c| match by_address.get(&c.address) {
                Some(existing)
                    if existing.weight == c.weight
                        && existing.labels == c.labels
                        && existing.health_status == c.health_status
                        && existing.workload == c.workload =>
                {
                    (*existing).clone()
                }
                Some(existing) => Arc::new(Endpoint {
                    address: c.address,
                    weight: c.weight,
                    labels: c.labels.clone(),
                    workload: c.workload.clone(),
                    health_status: c.health_status,
                    active_requests: AtomicUsize::new(0),
                    pool: existing.pool.clone(),
                    outlier: existing.outlier.clone(),
                }),
                None => Arc::new(Endpoint {
                    address: c.address,
                    weight: c.weight,
                    labels: c.labels.clone(),
                    workload: c.workload.clone(),
                    health_status: c.health_status,
                    active_requests: AtomicUsize::new(0),
                    pool: Pool::new(c.address, &self.config, self.stats.clone(), self.tls_stats.clone()),
                    outlier: self.outlier_detector.as_ref().map(|d| d.monitor()),
                }),
            })
            .collect();
        let set = EndpointSet::new(endpoints, self.config.healthy_panic_threshold);
        if let (Some(detector), Some(publishing)) = (&self.outlier_detector, publishing.as_mut()) {
            detector.replaced(publishing, &set, initial);
        }
        self.endpoints.store(Arc::new(set));
    }

    pub fn endpoints(&self) -> Vec<EndpointConfig> {
        self.endpoints
            .load()
            .endpoints
            .iter()
            .map(|e| EndpointConfig {
                address: e.address,
                weight: e.weight,
                labels: e.labels.clone(),
                health_status: e.health_status,
                workload: e.workload.clone(),
            })
            .collect()
    }

    #[cfg(test)]
    pub(crate) fn endpoint_set(&self) -> Arc<EndpointSet> {
        self.endpoints.load_full()
    }

    /// Each endpoint's address and outlier detection state (ejected, until when, how often),
    /// for /config_dump; empty without outlier detection.
    pub fn endpoint_health(&self) -> Vec<(SocketAddr, serde_json::Value)> {
        self.endpoints.load().endpoints.iter().filter_map(|e| Some((e.address, e.outlier.as_ref()?.dump()))).collect()
    }

    /// The endpoint for the next request or connection. `original_destination` is where the
    /// downstream connection was going before it was redirected; only ORIGINAL_DST clusters use it.
    /// None when no endpoint may take it: Envoy's 503 "no healthy upstream" (flag UH).
    pub fn pick_endpoint(&self, original_destination: Option<SocketAddr>) -> Option<Arc<Endpoint>> {
        if self.config.endpoints == EndpointSource::OriginalDestination {
            return original_destination.and_then(|address| self.original_destination_endpoint(address));
        }
        let set = self.endpoints.load();
        if set.panic {
            self.outlier_stats.lb_healthy_panic.fetch_add(1, Relaxed);
        }
        let picked = set.pick(self.config.lb_policy, &self.rotation).cloned();
        if picked.is_none() {
            self.outlier_stats.none_healthy.fetch_add(1, Relaxed);
        }
        picked
    }

    fn original_destination_endpoint(&self, address: SocketAddr) -> Option<Arc<Endpoint>> {
        let mut known = self.original_destinations.lock().unwrap();
        if let Some(endpoint) = known.get(&address) {
            return Some(endpoint.clone());
        }
        if known.len() >= MAX_ORIGINAL_DESTINATIONS {
            known.retain(|_, e| e.active_requests() > 0);
            if known.len() >= MAX_ORIGINAL_DESTINATIONS {
                return None;
            }
        }
        let endpoint = Arc::new(Endpoint {
            address,
            weight: 1,
            labels: Default::default(),
            workload: None,
            health_status: HealthStatus::Healthy,
            active_requests: AtomicUsize::new(0),
            pool: Pool::new(address, &self.config, self.stats.clone(), self.tls_stats.clone()),
            // Refused on ORIGINAL_DST clusters by the decoder.
            outlier: None,
        });
        known.insert(address, endpoint.clone());
        Some(endpoint)
    }

    /// Forget every pooled connection: requests from now on open new ones (and verify their
    /// peer again); exchanges in flight finish on the old ones, which then close.
    pub fn close_all(&self) {
        for endpoint in &self.endpoints.load().endpoints {
            endpoint.pool.forget_connections();
        }
        for endpoint in self.original_destinations.lock().unwrap().values() {
            endpoint.pool.forget_connections();
        }
    }

    /// Close connections idle past the cluster's idle timeout; `now` is the reaper's tick.
    pub fn close_idle(&self, now: Instant) {
        for endpoint in &self.endpoints.load().endpoints {
            endpoint.pool.close_expired(now);
        }
        for endpoint in self.original_destinations.lock().unwrap().values() {
            endpoint.pool.close_expired(now);
        }
    }
}
