//! A cluster at run time: its config, current endpoints (each with a pool) and statistics.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use hyper::body::Incoming;
use hyper::{Request, Response};

use super::lb::EndpointSet;
use super::pool::{ConnectionLease, Pool, UpstreamError};
use crate::http::request_body::RequestBody;
use crate::model::{ClusterConfig, EndpointConfig, EndpointSource};
use crate::telemetry::metrics::{ClusterStats, Metrics, TlsStats};

#[derive(Debug)]
pub struct Endpoint {
    pub address: SocketAddr,
    pub weight: u32,
    pub labels: std::collections::BTreeMap<String, String>,
    active_requests: AtomicUsize,
    pub pool: Pool,
}

impl Endpoint {
    pub fn active_requests(&self) -> usize {
        self.active_requests.load(Relaxed)
    }

    /// Send one request to this endpoint. The one place an exchange's outcome is known (its
    /// status, a connect failure, a reset): outlier detection records it here.
    pub async fn send(
        &self,
        request: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Option<ConnectionLease>), UpstreamError> {
        self.pool.send(request).await
    }

    /// A try that gave up waiting for this endpoint's response (a per-try or route timeout):
    /// outlier detection counts it as the endpoint's failure.
    pub fn record_timeout(&self) {}

    /// Count a request as active until the guard is dropped (least-request balancing reads it).
    pub fn start_request(self: &Arc<Self>) -> ActiveRequest {
        self.active_requests.fetch_add(1, Relaxed);
        ActiveRequest(self.clone())
    }
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
    /// The engine's TLS counters: pools and TCP proxies count upstream handshakes there.
    pub tls_stats: Arc<TlsStats>,
    endpoints: ArcSwap<EndpointSet>,
    rotation: AtomicUsize,
    /// ORIGINAL_DST clusters: one endpoint (and pool) per destination seen.
    original_destinations: Mutex<HashMap<SocketAddr, Arc<Endpoint>>>,
}

impl ClusterRuntime {
    pub fn new(config: ClusterConfig, endpoints: &[EndpointConfig], metrics: &Metrics) -> Arc<Self> {
        let runtime = Arc::new(ClusterRuntime {
            stats: metrics.cluster(&config.name),
            tls_stats: metrics.tls.clone(),
            config,
            endpoints: ArcSwap::from_pointee(EndpointSet::default()),
            rotation: AtomicUsize::new(fastrand::usize(..1024)),
            original_destinations: Mutex::new(HashMap::new()),
        });
        runtime.set_endpoints(endpoints);
        runtime
    }

    /// Replace the endpoint set; endpoints that stay keep their pooled connections.
    pub fn set_endpoints(&self, configs: &[EndpointConfig]) {
        let current = self.endpoints.load();
        let by_address: HashMap<SocketAddr, &Arc<Endpoint>> =
            current.endpoints.iter().map(|e| (e.address, e)).collect();
        let endpoints = configs
            .iter()
            .map(|c| match by_address.get(&c.address) {
                Some(existing) if existing.weight == c.weight && existing.labels == c.labels => (*existing).clone(),
                Some(existing) => Arc::new(Endpoint {
                    address: c.address,
                    weight: c.weight,
                    labels: c.labels.clone(),
                    active_requests: AtomicUsize::new(0),
                    pool: existing.pool.clone(),
                }),
                None => Arc::new(Endpoint {
                    address: c.address,
                    weight: c.weight,
                    labels: c.labels.clone(),
                    active_requests: AtomicUsize::new(0),
                    pool: Pool::new(c.address, &self.config, self.stats.clone(), self.tls_stats.clone()),
                }),
            })
            .collect();
        self.endpoints.store(Arc::new(EndpointSet::new(endpoints)));
    }

    pub fn endpoints(&self) -> Vec<EndpointConfig> {
        self.endpoints
            .load()
            .endpoints
            .iter()
            .map(|e| EndpointConfig { address: e.address, weight: e.weight, labels: e.labels.clone() })
            .collect()
    }

    /// The endpoint for the next request or connection. `original_destination` is where the
    /// downstream connection was going before it was redirected; only ORIGINAL_DST clusters use it.
    pub fn pick_endpoint(&self, original_destination: Option<SocketAddr>) -> Option<Arc<Endpoint>> {
        if self.config.endpoints == EndpointSource::OriginalDestination {
            return original_destination.and_then(|address| self.original_destination_endpoint(address));
        }
        self.endpoints.load().pick(self.config.lb_policy, &self.rotation).cloned()
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
            active_requests: AtomicUsize::new(0),
            pool: Pool::new(address, &self.config, self.stats.clone(), self.tls_stats.clone()),
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

    pub fn close_idle(&self) {
        for endpoint in &self.endpoints.load().endpoints {
            endpoint.pool.close_expired();
        }
        for endpoint in self.original_destinations.lock().unwrap().values() {
            endpoint.pool.close_expired();
        }
    }
}
