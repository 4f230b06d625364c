//! Istio's peer metadata from xDS metadata: an endpoint's workload (`meshctl.workload`, else
//! Istio's `istio.workload` string), a cluster's service (`istio.services`), and a listener's
//! Istio metrics settings (`meshctl.istio_stats`). Parsed once per config, never per request.

use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Metadata;
use envoy_types::pb::google::protobuf::{self, value::Kind};

use super::{At, FieldError, FieldResult};
use crate::telemetry::metrics::Metrics;
use crate::model::workload::{IstioStatsConfig, Reporter, ServiceMetadata, WorkloadMetadata};

fn string_field<'a>(fields: &'a protobuf::Struct, name: &str) -> FieldResult<&'a str> {
    match fields.fields.get(name).and_then(|v| v.kind.as_ref()) {
        None | Some(Kind::NullValue(_)) => Ok(""),
        Some(Kind::StringValue(s)) => Ok(s),
        Some(_) => Err(FieldError::new(name, "must be a string")),
    }
}

fn struct_field<'a>(fields: &'a protobuf::Struct, name: &str) -> FieldResult<Option<&'a protobuf::Struct>> {
    match fields.fields.get(name).and_then(|v| v.kind.as_ref()) {
        None | Some(Kind::NullValue(_)) => Ok(None),
        Some(Kind::StructValue(s)) => Ok(Some(s)),
        Some(_) => Err(FieldError::new(name, "must be an object")),
    }
}

/// `{workload, namespace, principal, app, version, canonical_service, canonical_revision, cluster}`.
fn workload(fields: &protobuf::Struct) -> FieldResult<WorkloadMetadata> {
    let get = |name| string_field(fields, name);
    Ok(WorkloadMetadata::new(
        get("workload")?,
        get("namespace")?,
        get("principal")?,
        get("app")?,
        get("version")?,
        get("canonical_service")?,
        get("canonical_revision")?,
        get("cluster")?,
    ))
}

/// An endpoint's workload; None when the control plane sent none (a ServiceEntry's address).
pub(crate) fn endpoint_workload(metadata: Option<&Metadata>) -> FieldResult<Option<Arc<WorkloadMetadata>>> {
    let Some(metadata) = metadata else { return Ok(None) };
    if let Some(fields) = metadata.filter_metadata.get("meshctl") {
        if let Some(found) = struct_field(fields, "workload").at("filter_metadata[\"meshctl\"]")? {
            return Ok(Some(Arc::new(workload(found).at("filter_metadata[\"meshctl\"].workload")?)));
        }
    }
    // Istio's own form: "NAME;NAMESPACE;CANONICAL_SERVICE;CANONICAL_REVISION;CLUSTER".
    if let Some(fields) = metadata.filter_metadata.get("istio") {
        let value = string_field(fields, "workload").at("filter_metadata[\"istio\"]")?;
        if !value.is_empty() {
            let parts: Vec<&str> = value.split(';').collect();
            let part = |i: usize| parts.get(i).copied().unwrap_or("");
            return Ok(Some(Arc::new(WorkloadMetadata::new(part(0), part(1), "", "", "", part(2), part(3), part(4)))));
        }
    }
    Ok(None)
}

/// The first of a cluster's `istio.services` (`[{host, name, namespace}]`), as Istio reports it.
pub(crate) fn cluster_service(metadata: Option<&Metadata>) -> FieldResult<Option<Arc<ServiceMetadata>>> {
    let Some(fields) = metadata.and_then(|m| m.filter_metadata.get("istio")) else { return Ok(None) };
    let at = "filter_metadata[\"istio\"].services";
    match fields.fields.get("services").and_then(|v| v.kind.as_ref()) {
        None | Some(Kind::NullValue(_)) => Ok(None),
        Some(Kind::ListValue(list)) => match list.values.first().and_then(|v| v.kind.as_ref()) {
            None => Ok(None),
            Some(Kind::StructValue(first)) => {
                let get = |name| string_field(first, name).at(format!("{at}[0]"));
                Ok(Some(Arc::new(ServiceMetadata::new(get("host")?, get("name")?, get("namespace")?))))
            }
            Some(_) => Err(FieldError::new(format!("{at}[0]"), "must be an object")),
        },
        Some(_) => Err(FieldError::new(at, "must be a list")),
    }
}

/// A listener's Istio metrics settings; None: the listener reports no Istio metrics.
pub(crate) fn istio_stats(metadata: Option<&Metadata>, metrics: &Metrics) -> FieldResult<Option<Arc<IstioStatsConfig>>> {
    let Some(fields) = metadata.and_then(|m| m.filter_metadata.get("meshctl")) else { return Ok(None) };
    let at = "filter_metadata[\"meshctl\"]";
    let Some(stats) = struct_field(fields, "istio_stats").at(at)? else { return Ok(None) };
    let at = format!("{at}.istio_stats");
    let reporter = match string_field(stats, "reporter").at(&at)? {
        "source" => Reporter::Source,
        "destination" => Reporter::Destination,
        other => {
            return Err(FieldError::new(format!("{at}.reporter"), format!("{other:?} is not a reporter (source or destination)")));
        }
    };
    let own = match struct_field(stats, "workload").at(&at)? {
        Some(found) => Arc::new(workload(found).at(format!("{at}.workload"))?),
        None => WorkloadMetadata::unknown(),
    };
    let service = match struct_field(stats, "service").at(&at)? {
        Some(found) => {
            let get = |name| string_field(found, name).at(format!("{at}.service"));
            Arc::new(ServiceMetadata::new(get("host")?, get("name")?, get("namespace")?))
        }
        None => ServiceMetadata::unknown(),
    };
    let peer_header = crate::telemetry::peer_header::encode(&own);
    Ok(Some(Arc::new(IstioStatsConfig { reporter, workload: own, service, peer_header, metrics: metrics.istio.clone() })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> protobuf::Value {
        protobuf::Value { kind: Some(Kind::StringValue(s.into())) }
    }

    fn object(fields: &[(&str, protobuf::Value)]) -> protobuf::Struct {
        protobuf::Struct { fields: fields.iter().map(|(k, v)| (k.to_string(), v.clone())).collect() }
    }

    fn metadata(namespace: &str, fields: protobuf::Struct) -> Metadata {
        Metadata { filter_metadata: [(namespace.to_string(), fields)].into_iter().collect(), ..Default::default() }
    }

    #[test]
    fn endpoint_workload_from_meshctl_or_istio_metadata() {
        let ours = metadata("meshctl", object(&[("workload", protobuf::Value {
            kind: Some(Kind::StructValue(object(&[("workload", text("cart-v2")), ("app", text("cart")), ("version", text("v2"))]))),
        })]));
        let found = endpoint_workload(Some(&ours)).unwrap().unwrap();
        assert_eq!((found.workload.as_str(), found.app.as_str(), found.canonical_revision.as_str()), ("cart-v2", "cart", "latest"));
        let istios = metadata("istio", object(&[("workload", text("cart-v2;shop;cart;v2;Kubernetes"))]));
        let found = endpoint_workload(Some(&istios)).unwrap().unwrap();
        assert_eq!((found.namespace.as_str(), found.canonical_revision.as_str(), found.cluster.as_str()), ("shop", "v2", "Kubernetes"));
        assert!(endpoint_workload(None).unwrap().is_none());
    }

    #[test]
    fn a_bad_reporter_is_refused_by_field() {
        let bad = metadata("meshctl", object(&[("istio_stats", protobuf::Value {
            kind: Some(Kind::StructValue(object(&[("reporter", text("sideways"))]))),
        })]));
        let error = istio_stats(Some(&bad), &Metrics::default()).unwrap_err().into_config_error("Listener \"x\"").to_string();
        assert!(error.contains("istio_stats.reporter") && error.contains("sideways"), "{error}");
    }
}
