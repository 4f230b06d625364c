//! xDS → model: decodes Envoy's v3 protobuf resources into the engine's typed model, refusing
//! (NACKing) every field that would change behaviour and that the engine does not implement.

// Deprecated xDS fields are still honoured by Envoy, so they are decoded (or refused) here too.
#![allow(deprecated)]

mod access_log;
mod adaptive_concurrency;
mod bootstrap;
mod circuit_breaker;
mod cluster;
mod common;
mod concurrency;
mod fallback;
mod fault;
mod listener;
mod global_ratelimit;
mod grpc_service;
mod local_ratelimit;
mod outlier;
mod rbac;
mod retry;
mod route;
mod secret;
mod tls;
mod tracing;
mod workload;

use std::fmt;

pub use bootstrap::{decode_bootstrap, BootstrapConfig};
pub use cluster::{decode_cluster, decode_cluster_load_assignment, LoadAssignment};
pub use listener::decode_listener;
pub(crate) use listener::check_cluster_references;
pub use route::decode_route_configuration;
pub use secret::decode_secret;

pub const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE_CONFIGURATION_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const CLUSTER_LOAD_ASSIGNMENT_TYPE: &str =
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const SECRET_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// A refused resource: which one, which field, and why. Its text is the NACK's error detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// e.g. `Listener "ingress"`.
    pub resource: String,
    /// Dotted path from the resource's root, e.g. `filter_chains[0].filters[0].typed_config`.
    pub field: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.resource, self.reason)
        } else {
            write!(f, "{}: field {}: {}", self.resource, self.field, self.reason)
        }
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    pub fn new(resource: impl Into<String>, field: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError { resource: resource.into(), field: field.into(), reason: reason.into() }
    }
}

/// An error inside one resource, before the resource's name is known; the path grows outwards.
#[derive(Debug)]
pub(crate) struct FieldError {
    segments: Vec<String>,
    reason: String,
}

impl FieldError {
    pub(crate) fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        let field = field.into();
        FieldError { segments: if field.is_empty() { vec![] } else { vec![field] }, reason: reason.into() }
    }

    pub(crate) fn unsupported(field: &str) -> Self {
        FieldError::new(field, "not supported by meshctl yet (refused rather than ignored, since it changes behaviour)")
    }

    pub(crate) fn into_config_error(self, resource: impl Into<String>) -> ConfigError {
        let field = self.segments.iter().rev().fold(String::new(), |mut path, segment| {
            if !path.is_empty() && !segment.starts_with('[') {
                path.push('.');
            }
            path.push_str(segment);
            path
        });
        ConfigError::new(resource, field, self.reason)
    }
}

/// Prefix the path of an error with the field it happened under.
pub(crate) trait At<T> {
    fn at(self, segment: impl fmt::Display) -> Result<T, FieldError>;
}

impl<T> At<T> for Result<T, FieldError> {
    fn at(self, segment: impl fmt::Display) -> Result<T, FieldError> {
        self.map_err(|mut e| {
            e.segments.push(segment.to_string());
            e
        })
    }
}

pub(crate) type FieldResult<T> = Result<T, FieldError>;

/// Refuse a field if it is set; used for the many fields the engine does not implement.
pub(crate) fn refuse_if(set: bool, field: &str) -> FieldResult<()> {
    if set {
        Err(FieldError::unsupported(field))
    } else {
        Ok(())
    }
}
