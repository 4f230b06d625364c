//! The engine's assembly: owns the runtime, wires listeners, clusters, routes and admin together,
//! and applies xDS updates atomically (all resources of one call, or none).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::sync::watch;

use crate::admin::{self, AdminSource};
use crate::model::secret::{Secret, SecretRegistry};
use crate::model::{ClusterConfig, EndpointConfig, EndpointSource, ListenerConfig};
use crate::registry::Registry;
use crate::runtime::EngineRuntime;
use crate::telemetry::metrics::Metrics;
use crate::transport::listener::{self, ListenerDeps, ListenerHandle};
use crate::upstream::ClusterRuntime;
use crate::xds::{self, ConfigError};

#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Tokio worker threads; a sidecar wants 1.
    pub worker_threads: usize,
    /// Istio series not updated for this long are dropped.
    pub istio_metrics_expiry: Duration,
    /// At most this many Istio series of each kind (HTTP, TCP); samples beyond are counted.
    pub istio_metrics_max_series: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            worker_threads: 1,
            istio_metrics_expiry: crate::telemetry::istio_metrics::DEFAULT_EXPIRY,
            istio_metrics_max_series: crate::telemetry::istio_metrics::DEFAULT_MAX_SERIES,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
}


pub struct Engine {
    runtime: Option<EngineRuntime>,
    state: Arc<EngineState>,
    admin_address: Option<SocketAddr>,
    stop_admin: watch::Sender<bool>,
}

struct EngineState {
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    /// Certificates and roots by name; TLS contexts read them at handshake time.
    secrets: Arc<SecretRegistry>,
    deps: Arc<ListenerDeps>,
    listeners: Mutex<BTreeMap<String, ListenerHandle>>,
    /// Listeners with `bind_to_port: false`: no socket, only connections handed over to them.
    handoff_listeners: Mutex<BTreeMap<String, Arc<ListenerConfig>>>,
    /// Endpoints received through EDS, kept even before (or after) their cluster exists.
    assignments: Mutex<HashMap<String, Vec<EndpointConfig>>>,
    /// The bytes each listener was last applied from: an identical re-send (xDS resends a whole
    /// type when one resource changes) must not disturb open connections.
    applied_listener_bytes: Mutex<HashMap<String, Vec<u8>>>,
    /// Serializes apply/remove so each is one consistent step.
    apply_lock: Mutex<()>,
    draining: AtomicBool,
    /// Where clusters' outlier detection sweeps run.
    runtime: tokio::runtime::Handle,
}

impl Engine {
    /// Decode the Bootstrap, bind every address, and start serving. Nothing is left running on error.
    pub fn start(bootstrap: &[u8], options: EngineOptions) -> Result<Engine, StartError> {
        let metrics = Arc::new(Metrics::default());
        metrics.istio.configure(options.istio_metrics_expiry, options.istio_metrics_max_series);
        let secrets = Arc::new(SecretRegistry::default());
        let config = xds::decode_bootstrap(bootstrap, &metrics, &secrets)?;
        let io_error = |context: String| move |source| StartError::Io { context, source };
        let admin_socket = match config.admin_address {
            Some(address) => Some(listener::bind(address).map_err(io_error(format!("admin address {address}")))?),
            None => None,
        };
        let (bound, handoff): (Vec<_>, Vec<_>) = config.listeners.into_iter().partition(|l| l.bind_to_port);
        let mut sockets = Vec::with_capacity(bound.len());
        for l in &bound {
            sockets.push(listener::bind(l.address).map_err(io_error(format!("listener {:?} on {}", l.name, l.address)))?);
        }
        let runtime = EngineRuntime::start(options.worker_threads).map_err(io_error("starting the runtime".into()))?;
        let registry = Arc::new(Registry::default());
        let state = Arc::new(EngineState {
            deps: Arc::new(ListenerDeps { registry: registry.clone(), metrics: metrics.clone() }),
            registry,
            metrics,
            secrets,
            listeners: Mutex::new(BTreeMap::new()),
            handoff_listeners: Mutex::new(handoff.into_iter().map(|l| (l.name.clone(), Arc::new(l))).collect()),
            assignments: Mutex::new(HashMap::new()),
            applied_listener_bytes: Mutex::new(HashMap::new()),
            apply_lock: Mutex::new(()),
            draining: AtomicBool::new(false),
            runtime: runtime.handle().clone(),
        });
        let clusters = config
            .clusters
            .into_iter()
            .map(|c| (c.name.clone(), state.new_cluster_runtime(c)))
            .collect();
        state.registry.clusters.store(Arc::new(clusters));
        let _entered = runtime.handle().enter();
        {
            let mut listeners = state.listeners.lock().unwrap();
            state.publish_handoff_listeners(&state.handoff_listeners.lock().unwrap());
            for (l, socket) in bound.into_iter().zip(sockets) {
                let name = l.name.clone();
                let handle = listener::spawn(socket, Arc::new(l), state.deps.clone())
                    .map_err(io_error(format!("listener {name:?}")))?;
                listeners.insert(name, handle);
            }
        }
        let (stop_admin, stop_admin_rx) = watch::channel(false);
        let admin_address = match admin_socket {
            Some(socket) => Some(
                admin::spawn(socket, state.clone() as Arc<dyn AdminSource>, stop_admin_rx)
                    .map_err(io_error("admin".into()))?,
            ),
            None => None,
        };
        let reaper_state = Arc::downgrade(&state);
        runtime.handle().spawn(async move {
            // Close idle upstream connections past their cluster's idle timeout.
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                // The tick's own instant, not the clock read after waking: a reaper woken late one
                // second and early the next still sees whole seconds pass.
                let now = tick.tick().await.into_std();
                let Some(state) = reaper_state.upgrade() else { return };
                for cluster in state.registry.clusters.load().values() {
                    cluster.close_idle(now);
                }
            }
        });
        drop(_entered);
        Ok(Engine { runtime: Some(runtime), state, admin_address, stop_admin })
    }

    pub fn apply(&self, type_url: &str, resources: &[Vec<u8>]) -> Result<(), ConfigError> {
        let Some(runtime) = &self.runtime else {
            return Err(ConfigError::new("Engine", "", "the engine has stopped"));
        };
        let _entered = runtime.handle().enter();
        let result = self.state.apply(type_url, resources);
        let kind = type_url.rsplit('.').next().unwrap_or(type_url);
        match &result {
            Ok(()) => self.state.metrics.config_applied(kind),
            Err(_) => self.state.metrics.config_rejected(kind),
        }
        result
    }

    pub fn remove(&self, type_url: &str, names: &[String]) -> Result<(), ConfigError> {
        self.state.remove(type_url, names)
    }

    pub fn stats_prometheus(&self) -> String {
        self.state.stats_prometheus()
    }

    pub fn config_dump(&self) -> String {
        self.state.config_dump()
    }

    /// The cumulative counts of every local rate limit descriptor a live config names.
    pub fn local_rate_limit_descriptor_counts(&self) -> Vec<crate::telemetry::metrics::DescriptorCount> {
        self.state.metrics.local_rate_limit_descriptor_counts()
    }

    pub fn admin_address(&self) -> Option<SocketAddr> {
        self.admin_address
    }

    pub fn listener_addresses(&self) -> Vec<(String, SocketAddr)> {
        self.state.listeners.lock().unwrap().iter().map(|(n, h)| (n.clone(), h.local_address)).collect()
    }

    /// Stop accepting, ask every connection to finish, wait for them up to `timeout`. Blocks.
    pub fn drain(&self, timeout: Duration) {
        let Some(runtime) = &self.runtime else { return };
        self.state.draining.store(true, Relaxed);
        let trackers: Vec<_> = {
            let listeners = self.state.listeners.lock().unwrap();
            listeners.values().map(|h| {
                h.drain();
                h.connections.clone()
            }).collect()
        };
        runtime.handle().block_on(async {
            let all_idle = futures_util::future::join_all(trackers.iter().map(|t| t.wait_idle()));
            let _ = tokio::time::timeout(timeout, all_idle).await;
        });
    }

    /// Close everything now. The engine cannot be used afterwards.
    pub fn stop(&mut self) {
        let _ = self.stop_admin.send(true);
        for handle in self.state.listeners.lock().unwrap().values() {
            handle.drain();
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop();
    }
}

impl EngineState {
    fn new_cluster_runtime(&self, config: ClusterConfig) -> Arc<ClusterRuntime> {
        let endpoints = match &config.endpoints {
            EndpointSource::Static { endpoints } => endpoints.clone(),
            EndpointSource::Eds { service_name } => {
                self.assignments.lock().unwrap().get(service_name).cloned().unwrap_or_default()
            }
            EndpointSource::OriginalDestination => Vec::new(),
        };
        let cluster = ClusterRuntime::new(config, &endpoints, &self.metrics);
        // Ends on its own once the cluster is removed or replaced.
        if let Some(sweeps) = cluster.sweeps() {
            self.runtime.spawn(sweeps);
        }
        cluster
    }

    fn apply(&self, type_url: &str, resources: &[Vec<u8>]) -> Result<(), ConfigError> {
        let _serialized = self.apply_lock.lock().unwrap();
        match type_url {
            xds::LISTENER_TYPE => self.apply_listeners(resources),
            xds::ROUTE_CONFIGURATION_TYPE => {
                let decoded = resources
                    .iter()
                    .map(|r| xds::decode_route_configuration(r, &self.metrics))
                    .collect::<Result<Vec<_>, _>>()?;
                let mut table = (**self.registry.routes.load()).clone();
                for config in decoded {
                    table.insert(config.name.clone(), Arc::new(config));
                }
                self.registry.routes.store(Arc::new(table));
                Ok(())
            }
            xds::CLUSTER_TYPE => {
                let decoded = resources.iter().map(|r| xds::decode_cluster(r, &self.secrets)).collect::<Result<Vec<_>, _>>()?;
                let mut table = (**self.registry.clusters.load()).clone();
                for config in decoded {
                    // An unchanged cluster keeps its runtime, and with it its pooled connections.
                    if table.get(&config.name).is_some_and(|existing| existing.config == config) {
                        continue;
                    }
                    table.insert(config.name.clone(), self.new_cluster_runtime(config));
                }
                self.registry.clusters.store(Arc::new(table));
                Ok(())
            }
            xds::CLUSTER_LOAD_ASSIGNMENT_TYPE => {
                let decoded = resources
                    .iter()
                    .map(|r| xds::decode_cluster_load_assignment(r))
                    .collect::<Result<Vec<_>, _>>()?;
                let mut assignments = self.assignments.lock().unwrap();
                for assignment in decoded {
                    self.set_eds_endpoints(&assignment.cluster_name, &assignment.endpoints);
                    assignments.insert(assignment.cluster_name, assignment.endpoints);
                }
                Ok(())
            }
            xds::SECRET_TYPE => {
                // All or nothing: every secret decodes before any is swapped in. Listeners and
                // clusters are not rebuilt; their next handshake reads the new secret.
                let decoded = resources.iter().map(|r| xds::decode_secret(r)).collect::<Result<Vec<_>, _>>()?;
                // New trust roots or revocations must also reach connections already open, whose
                // peers were verified against the old ones: they are drained (and pooled upstream
                // connections dropped), so each reconnects and is verified again. A new
                // certificate of our own (renewal) needs no such thing and drains nothing, and
                // neither does a re-sent trust bundle whose CRLs were merely re-issued (a
                // restarted control plane's): draining then would fail requests for nothing.
                let trust_changed = decoded.iter().any(|named| match &named.secret {
                    Secret::Validation(new) => {
                        self.secrets.slot(&named.name).validation().is_none_or(|old| !old.trusts_the_same_as(new))
                    }
                    Secret::Certificate(_) => false,
                });
                self.secrets.store(decoded);
                if trust_changed {
                    self.reverify_open_connections();
                }
                Ok(())
            }
            other => Err(ConfigError::new(other, "", "this resource type is not supported by meshctl's engine")),
        }
    }

    /// Whether a listener's bytes differ from those it was last applied from (or it is new).
    fn listener_differs_from_applied(&self, name: &str, bytes: &[u8]) -> bool {
        self.applied_listener_bytes.lock().unwrap().get(name).is_none_or(|previous| previous != bytes)
    }

    fn remember_applied_listener(&self, name: &str, bytes: &[u8]) {
        self.applied_listener_bytes.lock().unwrap().insert(name.to_string(), bytes.to_vec());
    }

    /// Drain every downstream connection and drop every pooled upstream connection, so each is
    /// opened again and its peer verified against the current roots and revocations.
    fn reverify_open_connections(&self) {
        for handle in self.listeners.lock().unwrap().values() {
            handle.drain_open_connections();
        }
        for cluster in self.registry.clusters.load().values() {
            cluster.close_all();
        }
    }

    fn set_eds_endpoints(&self, service_name: &str, endpoints: &[EndpointConfig]) {
        for cluster in self.registry.clusters.load().values() {
            if matches!(&cluster.config.endpoints, EndpointSource::Eds { service_name: s } if s == service_name) {
                cluster.set_endpoints(endpoints);
            }
        }
    }

    fn apply_listeners(&self, resources: &[Vec<u8>]) -> Result<(), ConfigError> {
        let decoded = resources
            .iter()
            .map(|r| xds::decode_listener(r, &self.metrics, &self.secrets))
            .collect::<Result<Vec<ListenerConfig>, _>>()?;
        let clusters = self.registry.clusters.load();
        for l in &decoded {
            xds::check_cluster_references(l, &|name| clusters.contains_key(name))?;
        }
        // Listeners whose config really changed. Their open connections are drained once the
        // new config is in: a multiplexed connection between sidecars lives for hours, and a new
        // authorization policy or PeerAuthentication must not wait for it to end.
        let changed: std::collections::HashSet<String> = decoded
            .iter()
            .zip(resources)
            .filter(|(l, bytes)| self.listener_differs_from_applied(&l.name, bytes))
            .map(|(l, _)| l.name.clone())
            .collect();
        let applied: Vec<(String, &Vec<u8>)> = decoded.iter().zip(resources).map(|(l, bytes)| (l.name.clone(), bytes)).collect();
        let mut listeners = self.listeners.lock().unwrap();
        let mut handoff = self.handoff_listeners.lock().unwrap();
        let (decoded, handoff_updates): (Vec<_>, Vec<_>) = decoded.into_iter().partition(|l| l.bind_to_port);
        // Bind every new address first, so a busy port refuses the whole update.
        let mut fresh_sockets = Vec::new();
        for l in &decoded {
            let unchanged_address = listeners.get(&l.name).is_some_and(|h| h.config.load().address == l.address);
            if !unchanged_address {
                let socket = listener::bind(l.address).map_err(|e| {
                    ConfigError::new(format!("Listener {:?}", l.name), "address", format!("cannot bind {}: {e}", l.address))
                })?;
                fresh_sockets.push((l.name.clone(), socket));
            }
        }
        let mut sockets: HashMap<String, std::net::TcpListener> = fresh_sockets.into_iter().collect();
        let handoff_changed = handoff_updates.iter().any(|l| changed.contains(&l.name));
        for l in handoff_updates {
            // A listener that stops binding its port gives its socket up.
            if let Some(old) = listeners.remove(&l.name) {
                old.drain();
            }
            handoff.insert(l.name.clone(), Arc::new(l));
        }
        for l in decoded {
            let name = l.name.clone();
            match sockets.remove(&name) {
                None => {
                    listeners[&name].update(Arc::new(l));
                    if changed.contains(&name) {
                        listeners[&name].drain_open_connections();
                    }
                }
                Some(socket) => {
                    let handle = listener::spawn(socket, Arc::new(l), self.deps.clone()).map_err(|e| {
                        ConfigError::new(format!("Listener {name:?}"), "address", format!("cannot listen: {e}"))
                    })?;
                    handoff.remove(&name);
                    if let Some(old) = listeners.insert(name, handle) {
                        old.drain();
                    }
                }
            }
        }
        self.publish_handoff_listeners(&handoff);
        for (name, bytes) in applied {
            self.remember_applied_listener(&name, bytes);
        }
        if handoff_changed {
            // Connections handed over by an original-destination listener run the handed-over
            // config: theirs changed, so they are drained from the listener that accepted them.
            for handle in listeners.values().filter(|h| h.config.load().use_original_dst) {
                handle.drain_open_connections();
            }
        }
        Ok(())
    }

    fn publish_handoff_listeners(&self, handoff: &BTreeMap<String, Arc<ListenerConfig>>) {
        let table = handoff.values().map(|l| (l.address, l.clone())).collect();
        self.registry.handoff_listeners.store(Arc::new(table));
    }

    fn remove(&self, type_url: &str, names: &[String]) -> Result<(), ConfigError> {
        let _serialized = self.apply_lock.lock().unwrap();
        match type_url {
            xds::LISTENER_TYPE => {
                let mut listeners = self.listeners.lock().unwrap();
                let mut handoff = self.handoff_listeners.lock().unwrap();
                let mut applied = self.applied_listener_bytes.lock().unwrap();
                for name in names {
                    if let Some(handle) = listeners.remove(name) {
                        handle.drain();
                    }
                    handoff.remove(name);
                    applied.remove(name);
                }
                self.publish_handoff_listeners(&handoff);
            }
            xds::ROUTE_CONFIGURATION_TYPE => {
                let mut table = (**self.registry.routes.load()).clone();
                names.iter().for_each(|n| drop(table.remove(n)));
                self.registry.routes.store(Arc::new(table));
            }
            xds::CLUSTER_TYPE => {
                let mut table = (**self.registry.clusters.load()).clone();
                names.iter().for_each(|n| drop(table.remove(n)));
                self.registry.clusters.store(Arc::new(table));
            }
            xds::CLUSTER_LOAD_ASSIGNMENT_TYPE => {
                let mut assignments = self.assignments.lock().unwrap();
                for name in names {
                    assignments.remove(name);
                    self.set_eds_endpoints(name, &[]);
                }
            }
            xds::SECRET_TYPE => self.secrets.remove(names),
            other => return Err(ConfigError::new(other, "", "this resource type is not supported by meshctl's engine")),
        }
        Ok(())
    }
}

impl AdminSource for EngineState {
    fn is_draining(&self) -> bool {
        self.draining.load(Relaxed)
    }

    fn stats_prometheus(&self) -> String {
        self.metrics.render_prometheus()
    }

    fn config_dump(&self) -> String {
        let mut listeners: Vec<_> = self
            .listeners
            .lock()
            .unwrap()
            .values()
            .map(|h| json!({"bound_address": h.local_address.to_string(), "config": &**h.config.load()}))
            .collect();
        listeners.extend(self.handoff_listeners.lock().unwrap().values().map(|l| json!({"config": &**l})));
        let routes = self.registry.routes.load();
        let route_configs: BTreeMap<_, _> = routes.iter().map(|(n, c)| (n.clone(), c.clone())).collect();
        let clusters: Vec<_> = {
            let table = self.registry.clusters.load();
            let mut sorted: Vec<_> = table.values().cloned().collect();
            sorted.sort_by(|a, b| a.config.name.cmp(&b.config.name));
            sorted.iter().map(cluster_dump).collect()
        };
        serde_json::to_string_pretty(&json!({
            "listeners": listeners,
            "route_configurations": route_configs,
            "clusters": clusters,
            "secrets": self.secrets.dump(),
        }))
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }
}

/// A cluster's config and endpoints; with outlier detection, each endpoint's ejection state.
fn cluster_dump(cluster: &Arc<ClusterRuntime>) -> serde_json::Value {
    let mut endpoints = serde_json::to_value(cluster.endpoints()).unwrap_or_default();
    if let Some(list) = endpoints.as_array_mut() {
        for (entry, (address, health)) in list.iter_mut().zip(cluster.endpoint_health()) {
            if entry["address"] == json!(address.to_string()) {
                entry["outlier_detection"] = health;
            }
        }
    }
    json!({"config": &cluster.config, "endpoints": endpoints})
}
