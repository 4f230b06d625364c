//! Who a workload is (Istio's peer metadata) and which service a cluster serves: the values of
//! Istio's standard metric labels, parsed once from xDS and shared by `Arc` on the request path.

use std::hash::{Hash, Hasher};
use std::sync::{Arc, OnceLock};

use serde::Serialize;

/// Istio's value for a label nobody knows.
pub const UNKNOWN: &str = "unknown";
/// Istio's canonical revision when a workload names none.
pub const LATEST: &str = "latest";

/// One workload's identity and labels. Built once (xDS decode, or one peer header per
/// connection), then only referenced; its hash is computed once so that a series lookup hashes
/// a few integers, never these strings.
#[derive(Debug, Clone, Serialize)]
pub struct WorkloadMetadata {
    pub workload: String,
    pub namespace: String,
    pub principal: String,
    pub app: String,
    pub version: String,
    pub canonical_service: String,
    pub canonical_revision: String,
    pub cluster: String,
    #[serde(skip)]
    hash: u64,
}

impl WorkloadMetadata {
    /// Empty values become Istio's defaults (`unknown`, `latest` for the canonical revision).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        workload: &str,
        namespace: &str,
        principal: &str,
        app: &str,
        version: &str,
        canonical_service: &str,
        canonical_revision: &str,
        cluster: &str,
    ) -> Self {
        let or = |value: &str, default: &str| if value.is_empty() { default.to_string() } else { value.to_string() };
        let mut metadata = WorkloadMetadata {
            workload: or(workload, UNKNOWN),
            namespace: or(namespace, UNKNOWN),
            principal: or(principal, UNKNOWN),
            app: or(app, UNKNOWN),
            version: or(version, UNKNOWN),
            canonical_service: or(canonical_service, UNKNOWN),
            canonical_revision: or(canonical_revision, LATEST),
            cluster: or(cluster, UNKNOWN),
            hash: 0,
        };
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        for field in metadata.fields() {
            field.hash(&mut hasher);
        }
        metadata.hash = hasher.finish();
        metadata
    }

    /// A peer known only by its verified SPIFFE ID: its principal, and the namespace the ID
    /// names (`spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/ACCOUNT`); the rest unknown.
    pub fn from_principal(principal: &str) -> Self {
        let namespace = principal
            .strip_prefix("spiffe://")
            .and_then(|rest| rest.split_once("/ns/"))
            .and_then(|(_, rest)| rest.split('/').next())
            .unwrap_or("");
        WorkloadMetadata::new("", namespace, principal, "", "", "", "", "")
    }

    /// The one everybody shares for a peer nobody knows.
    pub fn unknown() -> Arc<WorkloadMetadata> {
        static UNKNOWN_WORKLOAD: OnceLock<Arc<WorkloadMetadata>> = OnceLock::new();
        UNKNOWN_WORKLOAD.get_or_init(|| Arc::new(WorkloadMetadata::new("", "", "", "", "", "", "", ""))).clone()
    }

    /// The fields in the peer header's order.
    pub fn fields(&self) -> [&str; 8] {
        [
            &self.workload,
            &self.namespace,
            &self.principal,
            &self.app,
            &self.version,
            &self.canonical_service,
            &self.canonical_revision,
            &self.cluster,
        ]
    }

    pub fn precomputed_hash(&self) -> u64 {
        self.hash
    }
}

impl PartialEq for WorkloadMetadata {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.fields() == other.fields()
    }
}

impl Eq for WorkloadMetadata {}

/// The service a cluster serves (Istio's cluster metadata `istio.services`): the values of the
/// `destination_service*` labels.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceMetadata {
    /// The FQDN, e.g. `reviews.default.svc.cluster.local`.
    pub host: String,
    pub name: String,
    pub namespace: String,
    #[serde(skip)]
    hash: u64,
}

impl ServiceMetadata {
    pub fn new(host: &str, name: &str, namespace: &str) -> Self {
        let or = |value: &str| if value.is_empty() { UNKNOWN.to_string() } else { value.to_string() };
        let mut service = ServiceMetadata { host: or(host), name: or(name), namespace: or(namespace), hash: 0 };
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (&service.host, &service.name, &service.namespace).hash(&mut hasher);
        service.hash = hasher.finish();
        service
    }

    pub fn unknown() -> Arc<ServiceMetadata> {
        static UNKNOWN_SERVICE: OnceLock<Arc<ServiceMetadata>> = OnceLock::new();
        UNKNOWN_SERVICE.get_or_init(|| Arc::new(ServiceMetadata::new("", "", ""))).clone()
    }

    pub fn precomputed_hash(&self) -> u64 {
        self.hash
    }
}

impl PartialEq for ServiceMetadata {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && (&self.host, &self.name, &self.namespace) == (&other.host, &other.name, &other.namespace)
    }
}

impl Eq for ServiceMetadata {}

/// Which side of a call a listener reports as (Istio's `reporter` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reporter {
    /// The caller's outbound side.
    Source,
    /// The callee's inbound side.
    Destination,
}

impl Reporter {
    pub fn label(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

/// A listener's Istio metrics settings (listener metadata `meshctl.istio_stats`, pushed by the
/// control plane from the sidecar's registry record): which side it reports as, who this
/// workload is, and the service it serves.
#[derive(Debug, Serialize)]
pub struct IstioStatsConfig {
    pub reporter: Reporter,
    pub workload: Arc<WorkloadMetadata>,
    pub service: Arc<ServiceMetadata>,
    /// `workload` as the mesh header a source sends to mTLS peers, encoded once.
    #[serde(skip)]
    pub peer_header: http::HeaderValue,
    /// The engine's Istio series, which this listener's traffic updates.
    #[serde(skip)]
    pub metrics: Arc<crate::telemetry::istio_metrics::IstioMetrics>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_values_take_istios_defaults_and_equal_values_hash_alike() {
        let a = WorkloadMetadata::new("reviews-v1", "default", "", "reviews", "v1", "reviews", "", "");
        assert_eq!((a.principal.as_str(), a.canonical_revision.as_str(), a.cluster.as_str()), (UNKNOWN, LATEST, UNKNOWN));
        let b = WorkloadMetadata::new("reviews-v1", "default", "unknown", "reviews", "v1", "reviews", "latest", "unknown");
        assert_eq!(a, b);
        assert_eq!(a.precomputed_hash(), b.precomputed_hash());
        assert_ne!(a, WorkloadMetadata::new("reviews-v2", "default", "", "reviews", "v2", "reviews", "", ""));
    }

    #[test]
    fn a_spiffe_id_gives_principal_and_namespace() {
        let peer = WorkloadMetadata::from_principal("spiffe://cluster.local/ns/shop/sa/cart");
        assert_eq!((peer.namespace.as_str(), peer.principal.as_str()), ("shop", "spiffe://cluster.local/ns/shop/sa/cart"));
        assert_eq!((peer.workload.as_str(), peer.app.as_str()), (UNKNOWN, UNKNOWN));
        assert_eq!(WorkloadMetadata::from_principal("not-spiffe").namespace, UNKNOWN);
    }
}
