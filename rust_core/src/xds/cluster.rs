//! Cluster and ClusterLoadAssignment → model::ClusterConfig and endpoint lists.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3 as cluster;
use envoy_types::pb::envoy::config::endpoint::v3 as endpoint;
use envoy_types::pb::envoy::extensions::upstreams::http::v3 as upstream_http;
use envoy_types::pb::google::protobuf;
use prost::Message;

use super::common::{duration, socket_address, unpack};
use super::outlier;
use super::tls::upstream_tls_context;
use super::{refuse_if, At, ConfigError, FieldError, FieldResult};
use crate::model::cluster::*;
use crate::model::secret::SecretRegistry;
use crate::model::tls::UpstreamTls;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::UpstreamTlsContext;

const HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
const HTTP_PROTOCOL_OPTIONS_TYPE: &str =
    "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
const UPSTREAM_TLS_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";
const RAW_BUFFER_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer";

/// Endpoints delivered for one cluster (EDS).
#[derive(Debug, Clone)]
pub struct LoadAssignment {
    pub cluster_name: String,
    pub endpoints: Vec<EndpointConfig>,
}

pub fn decode_cluster(bytes: &[u8], secrets: &SecretRegistry) -> Result<ClusterConfig, ConfigError> {
    let message =
        cluster::Cluster::decode(bytes).map_err(|e| ConfigError::new("Cluster", "", format!("not a valid protobuf: {e}")))?;
    cluster_config(&message, secrets).map_err(|e| e.into_config_error(format!("Cluster {:?}", message.name)))
}

pub fn decode_cluster_load_assignment(bytes: &[u8]) -> Result<LoadAssignment, ConfigError> {
    let message = endpoint::ClusterLoadAssignment::decode(bytes)
        .map_err(|e| ConfigError::new("ClusterLoadAssignment", "", format!("not a valid protobuf: {e}")))?;
    load_assignment(&message, false)
        .map(|endpoints| LoadAssignment { cluster_name: message.cluster_name.clone(), endpoints })
        .map_err(|e| e.into_config_error(format!("ClusterLoadAssignment {:?}", message.cluster_name)))
}

pub(crate) fn cluster_config(c: &cluster::Cluster, secrets: &SecretRegistry) -> FieldResult<ClusterConfig> {
    use cluster::cluster::{ClusterDiscoveryType, DiscoveryType};
    if c.name.is_empty() {
        return Err(FieldError::new("name", "is required"));
    }
    refuse_if(!c.transport_socket_matches.is_empty(), "transport_socket_matches")?;
    refuse_if(!c.health_checks.is_empty(), "health_checks")?;
    refuse_if(c.lb_subset_config.is_some(), "lb_subset_config")?;
    refuse_if(c.load_balancing_policy.is_some(), "load_balancing_policy")?;
    refuse_if(c.upstream_bind_config.is_some(), "upstream_bind_config")?;
    refuse_if(!c.filters.is_empty(), "filters")?;
    refuse_if(c.upstream_config.is_some(), "upstream_config")?;
    refuse_if(c.lb_config.is_some(), "lb_config")?;
    refuse_if(c.protocol_selection != 0, "protocol_selection")?;
    let discovery = match &c.cluster_discovery_type {
        Some(ClusterDiscoveryType::Type(t)) => *t,
        Some(ClusterDiscoveryType::ClusterType(_)) => return Err(FieldError::unsupported("cluster_type")),
        None => DiscoveryType::Static as i32,
    };
    let endpoints = match DiscoveryType::try_from(discovery) {
        Ok(DiscoveryType::Static) | Ok(DiscoveryType::StrictDns) | Ok(DiscoveryType::LogicalDns) => {
            let resolve = discovery != DiscoveryType::Static as i32;
            let assignment = c.load_assignment.as_ref().ok_or_else(|| {
                FieldError::new("load_assignment", "is required for STATIC, STRICT_DNS and LOGICAL_DNS clusters")
            })?;
            EndpointSource::Static { endpoints: load_assignment(assignment, resolve).at("load_assignment")? }
        }
        Ok(DiscoveryType::Eds) => {
            refuse_if(c.load_assignment.is_some(), "load_assignment")?;
            let service_name = c
                .eds_cluster_config
                .as_ref()
                .map(|e| e.service_name.clone())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| c.name.clone());
            EndpointSource::Eds { service_name }
        }
        Ok(DiscoveryType::OriginalDst) => {
            refuse_if(c.load_assignment.is_some(), "load_assignment")?;
            EndpointSource::OriginalDestination
        }
        Err(_) => return Err(FieldError::new("type", format!("unknown value {discovery}"))),
    };
    let original_destination = matches!(endpoints, EndpointSource::OriginalDestination);
    // Each original destination is its own single-endpoint pool: nothing to eject it from.
    refuse_if(original_destination && c.outlier_detection.is_some(), "outlier_detection")?;
    let outlier_detection = c.outlier_detection.as_ref().map(outlier::outlier_detection).transpose().at("outlier_detection")?;
    let common_lb = match &c.common_lb_config {
        Some(common) => outlier::common_lb_config(common).at("common_lb_config")?,
        None => outlier::CommonLb::default(),
    };
    let lb_policy = match cluster::cluster::LbPolicy::try_from(c.lb_policy) {
        // The original destination decides; Envoy spells that CLUSTER_PROVIDED.
        Ok(cluster::cluster::LbPolicy::ClusterProvided) if original_destination => LbPolicy::RoundRobin,
        Ok(cluster::cluster::LbPolicy::RoundRobin) => LbPolicy::RoundRobin,
        Ok(cluster::cluster::LbPolicy::LeastRequest) => LbPolicy::LeastRequest,
        Ok(cluster::cluster::LbPolicy::Random) => LbPolicy::Random,
        Ok(other) => {
            return Err(FieldError::new("lb_policy", format!("{} is not supported by meshctl yet", other.as_str_name())))
        }
        Err(_) => return Err(FieldError::new("lb_policy", format!("unknown value {}", c.lb_policy))),
    };
    let connect_timeout = match &c.connect_timeout {
        Some(d) => duration(d).at("connect_timeout")?,
        None => Duration::from_secs(5),
    };
    if connect_timeout.is_zero() {
        return Err(FieldError::new("connect_timeout", "must be positive"));
    }
    let mut protocol = if c.http2_protocol_options.is_some() { UpstreamProtocol::Http2 } else { UpstreamProtocol::Http1 };
    let mut idle_timeout = Duration::from_secs(3600);
    let mut max_requests_per_connection = c.max_requests_per_connection.as_ref().map(|v| v.value).unwrap_or(0);
    let mut max_response_headers_bytes = 60 * 1024;
    if let Some(options) = &c.common_http_protocol_options {
        common_http_options(options, &mut idle_timeout, &mut max_requests_per_connection, &mut max_response_headers_bytes)
            .at("common_http_protocol_options")?;
    }
    for (key, any) in &c.typed_extension_protocol_options {
        let at = format!("typed_extension_protocol_options[{key:?}]");
        if key != HTTP_PROTOCOL_OPTIONS {
            return Err(FieldError::new(at, "only envoy.extensions.upstreams.http.v3.HttpProtocolOptions is supported"));
        }
        let options: upstream_http::HttpProtocolOptions = unpack(any, HTTP_PROTOCOL_OPTIONS_TYPE).at(&at)?;
        protocol = upstream_protocol(&options).at(&at)?;
        if let Some(common) = &options.common_http_protocol_options {
            common_http_options(common, &mut idle_timeout, &mut max_requests_per_connection, &mut max_response_headers_bytes)
                .at(format!("{at}.common_http_protocol_options"))?;
        }
    }
    let circuit_breakers = match &c.circuit_breakers {
        Some(breakers) => super::circuit_breaker::circuit_breakers(breakers).at("circuit_breakers")?,
        None => Default::default(),
    };
    let fallback = super::fallback::fallback(c.metadata.as_ref()).at("metadata")?.map(Arc::new);
    let queue_timeout = super::concurrency::queue_timeout(c.metadata.as_ref()).at("metadata")?;
    let service = super::workload::cluster_service(c.metadata.as_ref()).at("metadata")?;
    let tls = match &c.transport_socket {
        Some(socket) => transport_socket(socket, secrets).at("transport_socket")?,
        None => None,
    };
    Ok(ClusterConfig {
        name: c.name.clone(),
        connect_timeout,
        lb_policy,
        protocol,
        endpoints,
        idle_timeout,
        max_requests_per_connection,
        max_response_headers_bytes,
        tls,
        circuit_breakers,
        outlier_detection,
        healthy_panic_threshold: common_lb.healthy_panic_threshold,
        update_merge_window: common_lb.update_merge_window,
        fallback,
        queue_timeout,
        service,
    })
}

/// A cluster's transport socket: raw_buffer (plaintext) or an UpstreamTlsContext.
fn transport_socket(
    s: &envoy_types::pb::envoy::config::core::v3::TransportSocket,
    secrets: &SecretRegistry,
) -> FieldResult<Option<Arc<UpstreamTls>>> {
    use envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType;
    let Some(ConfigType::TypedConfig(any)) = &s.config_type else {
        return Err(FieldError::new("typed_config", "is required"));
    };
    match any.type_url.as_str() {
        RAW_BUFFER_TYPE => Ok(None),
        UPSTREAM_TLS_TYPE => {
            let context: UpstreamTlsContext = unpack(any, UPSTREAM_TLS_TYPE).at("typed_config")?;
            Ok(Some(Arc::new(upstream_tls_context(&context, any.value.clone(), secrets).at("typed_config")?)))
        }
        other => Err(FieldError::new("typed_config", format!("transport socket {other} is not supported by meshctl yet"))),
    }
}

fn common_http_options(
    options: &envoy_types::pb::envoy::config::core::v3::HttpProtocolOptions,
    idle_timeout: &mut Duration,
    max_requests_per_connection: &mut u32,
    max_response_headers_bytes: &mut u32,
) -> FieldResult<()> {
    refuse_if(options.max_connection_duration.is_some(), "max_connection_duration")?;
    refuse_if(options.max_stream_duration.is_some(), "max_stream_duration")?;
    refuse_if(options.headers_with_underscores_action != 0, "headers_with_underscores_action")?;
    if let Some(d) = &options.idle_timeout {
        *idle_timeout = duration(d).at("idle_timeout")?;
    }
    if let Some(v) = &options.max_requests_per_connection {
        *max_requests_per_connection = v.value;
    }
    if let Some(v) = &options.max_response_headers_kb {
        *max_response_headers_bytes = v.value.saturating_mul(1024);
    }
    Ok(())
}

fn upstream_protocol(options: &upstream_http::HttpProtocolOptions) -> FieldResult<UpstreamProtocol> {
    use upstream_http::http_protocol_options::explicit_http_config::ProtocolConfig;
    use upstream_http::http_protocol_options::UpstreamProtocolOptions;
    refuse_if(!options.http_filters.is_empty(), "http_filters")?;
    // Without an error matcher, HTTP outlier detection counts 5xx as errors: the default.
    refuse_if(options.outlier_detection.as_ref().is_some_and(|o| o.error_matcher.is_some()), "outlier_detection.error_matcher")?;
    refuse_if(options.retry_policy.is_some(), "retry_policy")?;
    refuse_if(!options.request_mirror_policies.is_empty(), "request_mirror_policies")?;
    match &options.upstream_protocol_options {
        Some(UpstreamProtocolOptions::ExplicitHttpConfig(explicit)) => match &explicit.protocol_config {
            Some(ProtocolConfig::HttpProtocolOptions(_)) => Ok(UpstreamProtocol::Http1),
            Some(ProtocolConfig::Http2ProtocolOptions(_)) => Ok(UpstreamProtocol::Http2),
            Some(ProtocolConfig::Http3ProtocolOptions(_)) => {
                Err(FieldError::unsupported("explicit_http_config.http3_protocol_options"))
            }
            None => Err(FieldError::new("explicit_http_config", "needs a protocol")),
        },
        Some(UpstreamProtocolOptions::UseDownstreamProtocolConfig(_)) => {
            Err(FieldError::unsupported("use_downstream_protocol_config"))
        }
        Some(UpstreamProtocolOptions::AutoConfig(_)) => Err(FieldError::unsupported("auto_config")),
        None => Ok(UpstreamProtocol::Http1),
    }
}

fn load_assignment(cla: &endpoint::ClusterLoadAssignment, resolve: bool) -> FieldResult<Vec<EndpointConfig>> {
    refuse_if(!cla.named_endpoints.is_empty(), "named_endpoints")?;
    if let Some(policy) = &cla.policy {
        refuse_if(!policy.drop_overloads.is_empty(), "policy.drop_overloads")?;
        // Both change when a cluster panics; meshctl uses Envoy's defaults (140, false).
        refuse_if(policy.overprovisioning_factor.as_ref().is_some_and(|f| f.value != 140), "policy.overprovisioning_factor")?;
        refuse_if(policy.weighted_priority_health, "policy.weighted_priority_health")?;
    }
    let mut endpoints = Vec::new();
    for (i, locality) in cla.endpoints.iter().enumerate() {
        let at = format!("endpoints[{i}]");
        refuse_if(locality.priority != 0, "priority").at(&at)?;
        refuse_if(locality.lb_config.is_some(), "lb_config").at(&at)?;
        for (j, lb_endpoint) in locality.lb_endpoints.iter().enumerate() {
            let at = format!("{at}.lb_endpoints[{j}]");
            if let Some(e) = lb_endpoint_config(lb_endpoint, resolve).at(&at)? {
                endpoints.push(e);
            }
        }
    }
    Ok(endpoints)
}

/// None for endpoints Envoy excludes from balancing altogether (draining).
fn lb_endpoint_config(e: &endpoint::LbEndpoint, resolve: bool) -> FieldResult<Option<EndpointConfig>> {
    use endpoint::lb_endpoint::HostIdentifier;
    let host = match &e.host_identifier {
        Some(HostIdentifier::Endpoint(host)) => host,
        Some(HostIdentifier::EndpointName(_)) => return Err(FieldError::unsupported("endpoint_name")),
        None => return Err(FieldError::new("endpoint", "is required")),
    };
    refuse_if(!host.additional_addresses.is_empty(), "endpoint.additional_addresses")?;
    let address = socket_address(&host.address, resolve).at("endpoint.address")?;
    let weight = e.load_balancing_weight.as_ref().map(|w| w.value).unwrap_or(1);
    if weight == 0 {
        return Err(FieldError::new("load_balancing_weight", "must be at least 1"));
    }
    // HealthStatus: UNKNOWN 0, HEALTHY 1, UNHEALTHY 2, DRAINING 3, TIMEOUT 4, DEGRADED 5.
    // Envoy keeps UNHEALTHY and TIMEOUT hosts (they count towards the panic threshold) and
    // excludes DRAINING ones from balancing.
    let health_status = match e.health_status {
        3 => return Ok(None),
        2 | 4 => HealthStatus::Unhealthy,
        _ => HealthStatus::Healthy,
    };
    let workload = super::workload::endpoint_workload(e.metadata.as_ref()).at("metadata")?;
    Ok(Some(EndpointConfig { address, weight, labels: labels(e.metadata.as_ref()), health_status, workload }))
}

/// String values under the `envoy.lb` and `istio` metadata namespaces, as endpoint labels.
fn labels(metadata: Option<&envoy_types::pb::envoy::config::core::v3::Metadata>) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let Some(metadata) = metadata else { return labels };
    for namespace in ["envoy.lb", "istio"] {
        if let Some(fields) = metadata.filter_metadata.get(namespace) {
            for (key, value) in &fields.fields {
                if let Some(protobuf::value::Kind::StringValue(s)) = &value.kind {
                    labels.insert(key.clone(), s.clone());
                }
            }
        }
    }
    labels
}
