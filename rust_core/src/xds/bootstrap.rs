//! Bootstrap → the static part of the model: admin address, listeners and clusters.

use std::collections::HashSet;
use std::net::SocketAddr;

use envoy_types::pb::envoy::config::bootstrap::v3 as bootstrap;
use prost::Message;

use super::cluster::cluster_config;
use super::common::socket_address;
use super::listener::{check_cluster_references, listener_config};
use super::secret::secret;
use super::{refuse_if, At, ConfigError, FieldError, FieldResult};
use crate::model::secret::{NamedSecret, SecretRegistry};
use crate::model::{ClusterConfig, ListenerConfig};
use crate::telemetry::metrics::Metrics;

#[derive(Debug)]
pub struct BootstrapConfig {
    pub admin_address: Option<SocketAddr>,
    pub listeners: Vec<ListenerConfig>,
    pub clusters: Vec<ClusterConfig>,
}

/// Static secrets are stored in `secrets` before listeners and clusters are decoded, so a
/// reference to one is bound like an SDS one (a refused bootstrap may leave them stored; the
/// engine is not started then).
pub fn decode_bootstrap(bytes: &[u8], metrics: &Metrics, secrets: &SecretRegistry) -> Result<BootstrapConfig, ConfigError> {
    let message = bootstrap::Bootstrap::decode(bytes)
        .map_err(|e| ConfigError::new("Bootstrap", "", format!("not a valid protobuf: {e}")))?;
    let config = bootstrap_config(&message, metrics, secrets).map_err(|e| e.into_config_error("Bootstrap"))?;
    let names: HashSet<&str> = config.clusters.iter().map(|c| c.name.as_str()).collect();
    for (i, listener) in config.listeners.iter().enumerate() {
        check_cluster_references(listener, &|name| names.contains(name)).map_err(|e| ConfigError {
            resource: "Bootstrap".into(),
            field: format!("static_resources.listeners[{i}].{}", e.field),
            reason: e.reason,
        })?;
    }
    Ok(config)
}

fn bootstrap_config(b: &bootstrap::Bootstrap, metrics: &Metrics, secrets: &SecretRegistry) -> FieldResult<BootstrapConfig> {
    refuse_if(b.dynamic_resources.is_some(), "dynamic_resources")?;
    refuse_if(b.hds_config.is_some(), "hds_config")?;
    refuse_if(b.overload_manager.is_some(), "overload_manager")?;
    refuse_if(b.tracing.is_some(), "tracing")?;
    refuse_if(!b.bootstrap_extensions.is_empty(), "bootstrap_extensions")?;
    let admin_address = match &b.admin {
        Some(admin) => Some(socket_address(&admin.address, false).at("admin.address")?),
        None => None,
    };
    let mut listeners = Vec::new();
    let mut clusters = Vec::new();
    if let Some(resources) = &b.static_resources {
        let mut static_secrets = Vec::with_capacity(resources.secrets.len());
        for (i, s) in resources.secrets.iter().enumerate() {
            let at = format!("static_resources.secrets[{i}]");
            let decoded = secret(s).at(&at)?;
            if static_secrets.iter().any(|other: &NamedSecret| other.name == decoded.name) {
                return Err(FieldError::new(format!("{at}.name"), format!("secret name {:?} is used twice", decoded.name)));
            }
            static_secrets.push(decoded);
        }
        secrets.store(static_secrets);
        let mut addresses = HashSet::new();
        for (i, l) in resources.listeners.iter().enumerate() {
            let at = format!("static_resources.listeners[{i}]");
            let listener = listener_config(l, metrics, secrets).at(&at)?;
            if listeners.iter().any(|other: &ListenerConfig| other.name == listener.name) {
                return Err(FieldError::new(format!("{at}.name"), format!("listener name {:?} is used twice", listener.name)));
            }
            if listener.address.port() != 0 && !addresses.insert(listener.address) {
                return Err(FieldError::new(format!("{at}.address"), format!("{} is used by two listeners", listener.address)));
            }
            listeners.push(listener);
        }
        for (i, c) in resources.clusters.iter().enumerate() {
            let at = format!("static_resources.clusters[{i}]");
            let cluster = cluster_config(c, secrets).at(&at)?;
            if clusters.iter().any(|other: &ClusterConfig| other.name == cluster.name) {
                return Err(FieldError::new(format!("{at}.name"), format!("cluster name {:?} is used twice", cluster.name)));
            }
            clusters.push(cluster);
        }
    }
    Ok(BootstrapConfig { admin_address, listeners, clusters })
}
