//! Listener → model::ListenerConfig: filter chains, TLS contexts, HTTP connection managers, TCP proxies.

use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::listener::v3 as listener;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3 as tcp_proxy;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
use envoy_types::pb::google::protobuf;
use prost::Message;

use super::adaptive_concurrency::{adaptive_concurrency, ADAPTIVE_CONCURRENCY_TYPE};
use super::common::{duration, socket_address, unpack};
use super::route::{refuse_connect_upgrade, route_configuration};
use super::fault::{http_fault, FAULT_FILTER_TYPE};
use super::global_ratelimit::{global_rate_limit, RATELIMIT_TYPE};
use super::local_ratelimit::{local_rate_limit, LOCAL_RATELIMIT_TYPE};
use super::rbac::{rbac_http_filter, RBAC_FILTER_TYPE};
use super::tls::{downstream_tls_context, forward_client_cert};
use super::{refuse_if, At, ConfigError, FieldError, FieldResult};
use crate::model::workload::IstioStatsConfig;
use crate::model::listener::*;
use crate::model::secret::SecretRegistry;
use crate::model::tracing::SpanKind;
use crate::policy::model::RbacFilters;
use crate::policy::path::{EscapedSlashes, PathNormalization};
use crate::telemetry::metrics::Metrics;

const HCM_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const TCP_PROXY_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
const ROUTER_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";
const DOWNSTREAM_TLS_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";
const RAW_BUFFER_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer";
const HTTP_INSPECTOR_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector";
const TLS_INSPECTOR_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector";

/// The engine's default wait for a client's first bytes before treating it as opaque TCP.
pub const DEFAULT_DETECTION_TIMEOUT: Duration = Duration::from_millis(300);

pub fn decode_listener(bytes: &[u8], metrics: &Metrics, secrets: &SecretRegistry) -> Result<ListenerConfig, ConfigError> {
    let message = listener::Listener::decode(bytes)
        .map_err(|e| ConfigError::new("Listener", "", format!("not a valid protobuf: {e}")))?;
    listener_config(&message, metrics, secrets).map_err(|e| e.into_config_error(format!("Listener {:?}", message.name)))
}

pub(crate) fn listener_config(l: &listener::Listener, metrics: &Metrics, secrets: &SecretRegistry) -> FieldResult<ListenerConfig> {
    if l.name.is_empty() {
        return Err(FieldError::new("name", "is required"));
    }
    let address = socket_address(&l.address, false).at("address")?;
    refuse_if(!l.additional_addresses.is_empty(), "additional_addresses")?;
    refuse_if(l.fcds_config.is_some(), "fcds_config")?;
    refuse_if(l.filter_chain_matcher.is_some(), "filter_chain_matcher")?;
    refuse_if(l.transparent.as_ref().is_some_and(|b| b.value), "transparent")?;
    refuse_if(l.freebind.as_ref().is_some_and(|b| b.value), "freebind")?;
    refuse_if(!l.socket_options.is_empty(), "socket_options")?;
    refuse_if(l.udp_listener_config.is_some(), "udp_listener_config")?;
    refuse_if(l.api_listener.is_some(), "api_listener")?;
    refuse_if(l.connection_balance_config.is_some(), "connection_balance_config")?;
    refuse_if(!l.access_log.is_empty(), "access_log")?;
    for (i, filter) in l.listener_filters.iter().enumerate() {
        listener_filter(filter).at(format!("listener_filters[{i}]"))?;
    }
    let detection_timeout = match &l.listener_filters_timeout {
        Some(d) => duration(d).at("listener_filters_timeout")?,
        None => DEFAULT_DETECTION_TIMEOUT,
    };
    // Without explicit listener filters the engine still classifies connections itself, and
    // falls back to opaque TCP on timeout, as the engine's protocol detection promises.
    let continue_on_detection_timeout = l.listener_filters.is_empty() || l.continue_on_listener_filters_timeout;
    // Istio's standard metrics: the listener's metadata says which side it reports as.
    let istio = super::workload::istio_stats(l.metadata.as_ref(), metrics).at("metadata")?;
    let istio = istio.as_ref();
    let mut filter_chains = Vec::with_capacity(l.filter_chains.len());
    for (i, chain) in l.filter_chains.iter().enumerate() {
        filter_chains.push(filter_chain(chain, metrics, secrets, istio).at(format!("filter_chains[{i}]"))?);
    }
    let mut default_filter_chain = match &l.default_filter_chain {
        Some(chain) => Some(filter_chain(chain, metrics, secrets, istio).at("default_filter_chain")?),
        None => None,
    };
    super::tracing::apply_direction(&mut filter_chains, l.traffic_direction);
    super::tracing::apply_direction(default_filter_chain.as_mut_slice(), l.traffic_direction);
    if filter_chains.is_empty() && default_filter_chain.is_none() {
        return Err(FieldError::new("filter_chains", "a listener needs at least one filter chain"));
    }
    let needs_detection = filter_chains.len() + usize::from(default_filter_chain.is_some()) > 1
        || filter_chains.iter().chain(default_filter_chain.iter()).any(|c| {
            c.tls.is_some()
                || matches!(c.handler, NetworkHandler::Http(_))
                || c.chain_match.transport_protocol.is_some()
                || !c.chain_match.application_protocols.is_empty()
                || !c.chain_match.server_names.is_empty()
        });
    Ok(ListenerConfig {
        name: l.name.clone(),
        use_original_dst: l.use_original_dst.as_ref().is_some_and(|b| b.value),
        bind_to_port: l.bind_to_port.as_ref().is_none_or(|b| b.value),
        address,
        filter_chains,
        default_filter_chain,
        detection_timeout,
        continue_on_detection_timeout,
        needs_detection,
    })
}

fn listener_filter(f: &listener::ListenerFilter) -> FieldResult<()> {
    refuse_if(f.filter_disabled.is_some(), "filter_disabled")?;
    let type_url = match &f.config_type {
        Some(listener::listener_filter::ConfigType::TypedConfig(any)) => any.type_url.as_str(),
        Some(listener::listener_filter::ConfigType::ConfigDiscovery(_)) => {
            return Err(FieldError::unsupported("config_discovery"))
        }
        None => "",
    };
    // The engine's own protocol detection does what these two Envoy listener filters do.
    match (f.name.as_str(), type_url) {
        (_, HTTP_INSPECTOR_TYPE) | (_, TLS_INSPECTOR_TYPE) => Ok(()),
        ("envoy.filters.listener.http_inspector" | "envoy.filters.listener.tls_inspector", "") => Ok(()),
        _ => Err(FieldError::new(
            "typed_config",
            format!("listener filter {:?} ({type_url}) is not supported by meshctl yet", f.name),
        )),
    }
}

fn filter_chain(c: &listener::FilterChain, metrics: &Metrics, secrets: &SecretRegistry, istio: Option<&Arc<IstioStatsConfig>>) -> FieldResult<FilterChainConfig> {
    refuse_if(c.use_proxy_proto.as_ref().is_some_and(|b| b.value), "use_proxy_proto")?;
    let chain_match = match &c.filter_chain_match {
        Some(m) => chain_match(m).at("filter_chain_match")?,
        None => ChainMatch::default(),
    };
    let tls = match &c.transport_socket {
        Some(socket) => transport_socket(socket, secrets).at("transport_socket")?,
        None => None,
    };
    if c.filters.len() != 1 {
        return Err(FieldError::new(
            "filters",
            format!(
                "meshctl supports exactly one network filter per chain (http_connection_manager or tcp_proxy), found {}",
                c.filters.len()
            ),
        ));
    }
    let handler = network_filter(&c.filters[0], metrics, istio).at("filters[0]")?;
    Ok(FilterChainConfig { name: c.name.clone(), chain_match, tls, handler })
}

fn chain_match(m: &listener::FilterChainMatch) -> FieldResult<ChainMatch> {
    refuse_if(!m.prefix_ranges.is_empty(), "prefix_ranges")?;
    refuse_if(!m.address_suffix.is_empty() || m.suffix_len.is_some(), "address_suffix")?;
    refuse_if(!m.direct_source_prefix_ranges.is_empty(), "direct_source_prefix_ranges")?;
    refuse_if(m.source_type != 0, "source_type")?;
    refuse_if(!m.source_prefix_ranges.is_empty(), "source_prefix_ranges")?;
    refuse_if(!m.source_ports.is_empty(), "source_ports")?;
    let transport_protocol = Some(m.transport_protocol.clone()).filter(|t| !t.is_empty());
    if let Some(t) = &transport_protocol {
        if t != "tls" && t != "raw_buffer" {
            return Err(FieldError::new("transport_protocol", format!("{t:?} must be \"tls\" or \"raw_buffer\"")));
        }
    }
    let destination_port = match &m.destination_port {
        Some(p) => Some(u16::try_from(p.value).map_err(|_| FieldError::new("destination_port", "is not a port"))?),
        None => None,
    };
    Ok(ChainMatch {
        transport_protocol,
        application_protocols: m.application_protocols.clone(),
        server_names: m.server_names.iter().map(|s| s.to_ascii_lowercase()).collect(),
        destination_port,
    })
}

fn transport_socket(s: &envoy_types::pb::envoy::config::core::v3::TransportSocket, secrets: &SecretRegistry) -> FieldResult<Option<ServerTls>> {
    use envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType;
    let any: &protobuf::Any = match &s.config_type {
        Some(ConfigType::TypedConfig(any)) => any,
        None => return Err(FieldError::new("typed_config", "is required")),
    };
    match any.type_url.as_str() {
        RAW_BUFFER_TYPE => Ok(None),
        DOWNSTREAM_TLS_TYPE => {
            let context: tls::DownstreamTlsContext = unpack(any, DOWNSTREAM_TLS_TYPE).at("typed_config")?;
            Ok(Some(downstream_tls_context(&context, secrets).at("typed_config")?))
        }
        other => Err(FieldError::new("typed_config", format!("transport socket {other} is not supported by meshctl yet"))),
    }
}

fn network_filter(f: &listener::Filter, metrics: &Metrics, istio: Option<&Arc<IstioStatsConfig>>) -> FieldResult<NetworkHandler> {
    let any = match &f.config_type {
        Some(listener::filter::ConfigType::TypedConfig(any)) => any,
        Some(listener::filter::ConfigType::ConfigDiscovery(_)) => return Err(FieldError::unsupported("config_discovery")),
        None => return Err(FieldError::new("typed_config", "is required")),
    };
    match any.type_url.as_str() {
        HCM_TYPE => {
            let manager: hcm::HttpConnectionManager = unpack(any, HCM_TYPE).at("typed_config")?;
            let mut settings = http_settings(&manager, metrics).at("typed_config")?;
            settings.istio = istio.cloned();
            Ok(NetworkHandler::Http(Arc::new(settings)))
        }
        TCP_PROXY_TYPE => {
            let proxy: tcp_proxy::TcpProxy = unpack(any, TCP_PROXY_TYPE).at("typed_config")?;
            let mut config = tcp_proxy_config(&proxy).at("typed_config")?;
            config.istio = istio.cloned();
            Ok(NetworkHandler::TcpProxy(config))
        }
        other => Err(FieldError::new("typed_config", format!("network filter {other} is not supported by meshctl yet"))),
    }
}

fn http_settings(m: &hcm::HttpConnectionManager, metrics: &Metrics) -> FieldResult<HttpSettings> {
    use hcm::http_connection_manager::RouteSpecifier;
    refuse_if(m.http3_protocol_options.is_some(), "http3_protocol_options")?;
    refuse_if(m.local_reply_config.is_some(), "local_reply_config")?;
    let forward_client_cert = forward_client_cert(m)?;
    refuse_if(m.request_id_extension.is_some(), "request_id_extension")?;
    refuse_if(!m.original_ip_detection_extensions.is_empty(), "original_ip_detection_extensions")?;
    refuse_if(!m.early_header_mutation_extensions.is_empty(), "early_header_mutation_extensions")?;
    refuse_if(m.internal_address_config.is_some(), "internal_address_config")?;
    let codec = match m.codec_type {
        0 => HttpCodec::Auto,
        1 => HttpCodec::Http1,
        2 => HttpCodec::Http2,
        3 => return Err(FieldError::new("codec_type", "HTTP3 is not supported by meshctl yet")),
        other => return Err(FieldError::new("codec_type", format!("unknown value {other}"))),
    };
    let routes = match &m.route_specifier {
        Some(RouteSpecifier::RouteConfig(rc)) => {
            RouteSource::Inline { config: Arc::new(route_configuration(rc, metrics).at("route_config")?) }
        }
        Some(RouteSpecifier::Rds(rds)) => {
            if rds.route_config_name.is_empty() {
                return Err(FieldError::new("rds.route_config_name", "is required"));
            }
            RouteSource::Rds { name: rds.route_config_name.clone() }
        }
        Some(RouteSpecifier::ScopedRoutes(_)) => return Err(FieldError::unsupported("scoped_routes")),
        None => return Err(FieldError::new("", "an HTTP connection manager needs route_config or rds")),
    };
    let path_normalization = path_normalization(m)?;
    let mut rbac = RbacFilters { filters: Vec::new(), allowed: metrics.rbac.allowed() };
    let mut router_seen = false;
    let mut fault = None;
    let mut filters = Vec::new();
    for (i, filter) in m.http_filters.iter().enumerate() {
        let typed_config = match &filter.config_type {
            Some(hcm::http_filter::ConfigType::TypedConfig(any)) => Some(any),
            Some(_) => return Err(FieldError::unsupported(&format!("http_filters[{i}].config_discovery"))),
            None => None,
        };
        let type_url = match typed_config {
            Some(any) => any.type_url.as_str(),
            None if filter.name == "envoy.filters.http.router" => ROUTER_TYPE,
            None if filter.name == "envoy.filters.http.rbac" => {
                return Err(FieldError::new(format!("http_filters[{i}].typed_config"), "is required for the RBAC filter"))
            }
            None => "",
        };
        if let Some(any) = typed_config.filter(|any| any.type_url == RBAC_FILTER_TYPE) {
            // A disabled filter runs only where a route enables it, which meshctl cannot do yet.
            refuse_if(filter.disabled, "disabled").at(format!("http_filters[{i}]"))?;
            if let Some(decoded) = rbac_http_filter(any, metrics).at(format!("http_filters[{i}].typed_config"))? {
                rbac.filters.push(decoded);
            }
            continue;
        }
        if let Some(any) = typed_config.filter(|any| any.type_url == FAULT_FILTER_TYPE) {
            // A disabled filter runs only where a route enables it, which meshctl cannot do yet.
            refuse_if(filter.disabled, "disabled").at(format!("http_filters[{i}]"))?;
            if fault.is_some() {
                return Err(FieldError::new(format!("http_filters[{i}]"), "meshctl supports one fault filter per connection manager"));
            }
            fault = Some(Arc::new(http_fault(any).at(format!("http_filters[{i}].typed_config"))?));
            filters.push(HttpFilter::Fault);
            continue;
        }
        if let Some(any) = typed_config.filter(|any| any.type_url == LOCAL_RATELIMIT_TYPE) {
            // A disabled filter runs only where a route enables it, which meshctl cannot do yet.
            refuse_if(filter.disabled, "disabled").at(format!("http_filters[{i}]"))?;
            // Each instance has its own buckets; routes configure it by its name, as in Envoy.
            filter_name(&filter.name).at(format!("http_filters[{i}].name"))?;
            let config = local_rate_limit(any, false, metrics).at(format!("http_filters[{i}].typed_config"))?;
            filters.push(HttpFilter::LocalRateLimit { name: filter.name.clone(), config });
            continue;
        }
        if let Some(any) = typed_config.filter(|any| any.type_url == ADAPTIVE_CONCURRENCY_TYPE) {
            // A disabled filter runs only where a route enables it, which meshctl cannot do yet.
            refuse_if(filter.disabled, "disabled").at(format!("http_filters[{i}]"))?;
            // Both would share the connection manager's stats and measure the same requests.
            if filters.iter().any(|f| matches!(f, HttpFilter::AdaptiveConcurrency { .. })) {
                return Err(FieldError::new(format!("http_filters[{i}]"), "meshctl supports one adaptive concurrency filter per connection manager"));
            }
            let config = adaptive_concurrency(any, &m.stat_prefix, metrics).at(format!("http_filters[{i}].typed_config"))?;
            filters.push(HttpFilter::AdaptiveConcurrency { config });
            continue;
        }
        if let Some(any) = typed_config.filter(|any| any.type_url == RATELIMIT_TYPE) {
            // A disabled filter runs only where a route enables it, which meshctl cannot do yet.
            refuse_if(filter.disabled, "disabled").at(format!("http_filters[{i}]"))?;
            filter_name(&filter.name).at(format!("http_filters[{i}].name"))?;
            let config = global_rate_limit(any).at(format!("http_filters[{i}].typed_config"))?;
            filters.push(HttpFilter::GlobalRateLimit { name: filter.name.clone(), index: i, config });
            continue;
        }
        if type_url != ROUTER_TYPE {
            if filter.is_optional || filter.disabled {
                continue;
            }
            return Err(FieldError::new(
                format!("http_filters[{i}]"),
                format!("HTTP filter {:?} ({type_url}) is not supported by meshctl yet", filter.name),
            ));
        }
        if i + 1 != m.http_filters.len() {
            return Err(FieldError::new(format!("http_filters[{i}]"), "the router must be the last HTTP filter"));
        }
        router_seen = true;
    }
    if !router_seen {
        return Err(FieldError::new("http_filters", "the router filter (envoy.filters.http.router) is required, last"));
    }
    let mut limits = HttpLimits::default();
    if let Some(d) = &m.request_headers_timeout {
        limits.request_headers_timeout = Some(duration(d).at("request_headers_timeout")?).filter(|d| !d.is_zero());
    }
    if let Some(options) = &m.common_http_protocol_options {
        if let Some(d) = &options.idle_timeout {
            limits.idle_timeout =
                Some(duration(d).at("common_http_protocol_options.idle_timeout")?).filter(|d| !d.is_zero());
        }
        if let Some(v) = &options.max_headers_count {
            limits.max_headers_count = v.value.max(1);
        }
        refuse_if(options.max_connection_duration.is_some(), "common_http_protocol_options.max_connection_duration")?;
        refuse_if(options.max_stream_duration.is_some(), "common_http_protocol_options.max_stream_duration")?;
        refuse_if(options.headers_with_underscores_action != 0, "common_http_protocol_options.headers_with_underscores_action")?;
    }
    if let Some(v) = &m.max_request_headers_kb {
        if v.value == 0 || v.value > 8192 {
            return Err(FieldError::new("max_request_headers_kb", "must be between 1 and 8192"));
        }
        limits.max_request_headers_bytes = v.value * 1024;
    }
    if let Some(options) = &m.http2_protocol_options {
        if let Some(v) = &options.max_concurrent_streams {
            limits.max_concurrent_streams = v.value.max(1);
        }
        if let Some(v) = &options.initial_stream_window_size {
            limits.initial_stream_window_size = v.value.clamp(65535, 1 << 30);
        }
        if let Some(v) = &options.initial_connection_window_size {
            limits.initial_connection_window_size = v.value.clamp(65535, 1 << 30);
        }
    }
    let mut upgrades = Vec::new();
    for (i, u) in m.upgrade_configs.iter().enumerate() {
        refuse_if(!u.filters.is_empty(), "filters").at(format!("upgrade_configs[{i}]"))?;
        refuse_connect_upgrade(&u.upgrade_type).at(format!("upgrade_configs[{i}]"))?;
        if u.enabled.as_ref().map(|b| b.value).unwrap_or(true) {
            upgrades.push(u.upgrade_type.to_ascii_lowercase());
        }
    }
    // Last: a logger's file is opened (and its writer started) only for a config that is valid.
    let access_log = super::access_log::access_logs(&m.access_log)?;
    // The span kind is the listener's to say (its traffic_direction): see tracing::apply_direction.
    let tracing = match &m.tracing {
        Some(t) => Some(Arc::new(super::tracing::tracing_config(t, SpanKind::Server).at("tracing")?)),
        None => None,
    };
    Ok(HttpSettings { tracing, stat_prefix: m.stat_prefix.clone(), routes, codec, limits, upgrades, path_normalization, rbac, forward_client_cert, fault, filters, access_log, istio: None,
        client_address_from_xff: (!m.use_remote_address.as_ref().is_some_and(|b| b.value)).then_some(m.xff_num_trusted_hops),
    })
}

/// Routes find a filter instance's per-route config by its name. Envoy 1.40 accepts two
/// instances with one name; both then take a route's config for that name (and share its buckets,
/// the per-route config being one object), as here.
fn filter_name(name: &str) -> FieldResult<()> {
    if name.is_empty() {
        return Err(FieldError::new("", "is required"));
    }
    Ok(())
}

/// normalize_path, merge_slashes and path_with_escaped_slashes_action; Envoy's defaults are off
/// and KEEP_UNCHANGED.
fn path_normalization(m: &hcm::HttpConnectionManager) -> FieldResult<PathNormalization> {
    use hcm::http_connection_manager::PathWithEscapedSlashesAction as Action;
    let escaped_slashes = match Action::try_from(m.path_with_escaped_slashes_action) {
        Ok(Action::ImplementationSpecificDefault | Action::KeepUnchanged) => EscapedSlashes::KeepUnchanged,
        Ok(Action::RejectRequest) => EscapedSlashes::RejectRequest,
        Ok(Action::UnescapeAndForward) => EscapedSlashes::UnescapeAndForward,
        Ok(Action::UnescapeAndRedirect) => {
            return Err(FieldError::new(
                "path_with_escaped_slashes_action",
                "UNESCAPE_AND_REDIRECT is not supported by meshctl yet (use REJECT_REQUEST or UNESCAPE_AND_FORWARD)",
            ))
        }
        Err(_) => {
            return Err(FieldError::new("path_with_escaped_slashes_action", format!("unknown value {}", m.path_with_escaped_slashes_action)))
        }
    };
    refuse_if(m.path_normalization_options.is_some(), "path_normalization_options")?;
    Ok(PathNormalization {
        normalize: m.normalize_path.as_ref().is_some_and(|b| b.value),
        merge_slashes: m.merge_slashes,
        escaped_slashes,
    })
}

fn tcp_proxy_config(p: &tcp_proxy::TcpProxy) -> FieldResult<TcpProxyConfig> {
    use tcp_proxy::tcp_proxy::ClusterSpecifier;
    refuse_if(p.on_demand.is_some(), "on_demand")?;
    refuse_if(p.metadata_match.is_some(), "metadata_match")?;
    refuse_if(!p.access_log.is_empty(), "access_log")?;
    refuse_if(p.tunneling_config.is_some(), "tunneling_config")?;
    refuse_if(p.max_downstream_connection_duration.is_some(), "max_downstream_connection_duration")?;
    refuse_if(!p.hash_policy.is_empty(), "hash_policy")?;
    let cluster = match &p.cluster_specifier {
        Some(ClusterSpecifier::Cluster(c)) if !c.is_empty() => c.clone(),
        Some(ClusterSpecifier::WeightedClusters(_)) => return Err(FieldError::unsupported("weighted_clusters")),
        _ => return Err(FieldError::new("cluster", "is required")),
    };
    let idle_timeout = match &p.idle_timeout {
        Some(d) => Some(duration(d).at("idle_timeout")?).filter(|d| !d.is_zero()),
        // Envoy's default for tcp_proxy.
        None => Some(Duration::from_secs(3600)),
    };
    Ok(TcpProxyConfig { stat_prefix: p.stat_prefix.clone(), cluster, idle_timeout, istio: None })
}

/// Every cluster an inline route table or TCP proxy names must exist (Envoy's validate_clusters
/// default for static route tables); RDS tables are checked per request instead.
pub(crate) fn check_cluster_references(l: &ListenerConfig, exists: &dyn Fn(&str) -> bool) -> Result<(), ConfigError> {
    use crate::model::route::{Action, ClusterChoice};
    let chains = l.filter_chains.iter().enumerate().map(|(i, c)| (format!("filter_chains[{i}]"), c));
    for (at, chain) in chains.chain(l.default_filter_chain.iter().map(|c| ("default_filter_chain".to_string(), c))) {
        let missing = |field: String, name: &str| {
            ConfigError::new(format!("Listener {:?}", l.name), format!("{at}.filters[0].typed_config.{field}"), format!("cluster {name:?} is not defined"))
        };
        match &chain.handler {
            NetworkHandler::TcpProxy(p) if !exists(&p.cluster) => return Err(missing("cluster".into(), &p.cluster)),
            NetworkHandler::Http(settings) => {
                for filter in &settings.filters {
                    if let HttpFilter::GlobalRateLimit { index, config, .. } = filter {
                        if !exists(&config.cluster) {
                            let field = format!("http_filters[{index}].typed_config.rate_limit_service.grpc_service.envoy_grpc.cluster_name");
                            return Err(missing(field, &config.cluster));
                        }
                    }
                }
                let RouteSource::Inline { config } = &settings.routes else { continue };
                for (v, vhost) in config.virtual_hosts.iter().enumerate() {
                    for (r, route) in vhost.routes.iter().enumerate() {
                        let Action::Forward(forward) = &route.action else { continue };
                        let field = format!("route_config.virtual_hosts[{v}].routes[{r}].route");
                        match &forward.clusters {
                            ClusterChoice::Single { name } if !exists(name) => return Err(missing(format!("{field}.cluster"), name)),
                            ClusterChoice::Weighted(w) => {
                                for (c, wc) in w.clusters.iter().enumerate() {
                                    if !exists(&wc.name) {
                                        return Err(missing(format!("{field}.weighted_clusters.clusters[{c}].name"), &wc.name));
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}
