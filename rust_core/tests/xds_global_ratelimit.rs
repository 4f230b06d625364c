//! The global rate limit filter (envoy.filters.http.ratelimit) and several local rate limit
//! instances in one connection manager: decoded with Envoy's defaults, or refused by field.

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::listener::v3 as listener;
use envoy_types::pb::envoy::config::ratelimit::v3::RateLimitServiceConfig;
use envoy_types::pb::envoy::config::route::v3 as route;
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3 as lrl;
use envoy_types::pb::envoy::extensions::filters::http::ratelimit::v3 as rl;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::google::protobuf::{Any, Duration as ProtoDuration};
use meshctl_engine::model::global_ratelimit::RequestType;
use meshctl_engine::model::secret::SecretRegistry;
use meshctl_engine::model::{HttpFilter, ListenerConfig, NetworkHandler};
use meshctl_engine::telemetry::metrics::Metrics;
use meshctl_engine::xds::{self, ConfigError};
use prost::Message;
use std::time::Duration;

const RL_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit";
const LRL_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit";
const HCM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const ROUTER_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";

fn any<M: Message>(type_url: &str, message: &M) -> Any {
    Any { type_url: type_url.into(), value: message.encode_to_vec() }
}

fn filter<M: Message>(name: &str, type_url: &str, message: &M) -> hcm::HttpFilter {
    hcm::HttpFilter {
        name: name.into(),
        config_type: Some(hcm::http_filter::ConfigType::TypedConfig(any(type_url, message))),
        ..Default::default()
    }
}

fn service(cluster: &str) -> Option<RateLimitServiceConfig> {
    Some(RateLimitServiceConfig {
        grpc_service: Some(core::GrpcService {
            target_specifier: Some(core::grpc_service::TargetSpecifier::EnvoyGrpc(core::grpc_service::EnvoyGrpc {
                cluster_name: cluster.into(),
                ..Default::default()
            })),
            ..Default::default()
        }),
        transport_api_version: core::ApiVersion::V3 as i32,
    })
}

fn global(configure: impl FnOnce(&mut rl::RateLimit)) -> hcm::HttpFilter {
    let mut c = rl::RateLimit { domain: "mesh".into(), rate_limit_service: service("rls"), ..Default::default() };
    configure(&mut c);
    filter("envoy.filters.http.ratelimit", RL_TYPE, &c)
}

fn listener_with(mut filters: Vec<hcm::HttpFilter>) -> Result<ListenerConfig, ConfigError> {
    filters.push(filter("envoy.filters.http.router", ROUTER_TYPE, &rl::RateLimit::default()));
    let manager = hcm::HttpConnectionManager {
        stat_prefix: "outbound".into(),
        http_filters: filters,
        route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::RouteConfig(route::RouteConfiguration {
            name: "local".into(),
            ..Default::default()
        })),
        ..Default::default()
    };
    let l = listener::Listener {
        name: "outbound".into(),
        address: Some(core::Address {
            address: Some(core::address::Address::SocketAddress(core::SocketAddress {
                address: "127.0.0.1".into(),
                port_specifier: Some(core::socket_address::PortSpecifier::PortValue(0)),
                ..Default::default()
            })),
        }),
        filter_chains: vec![listener::FilterChain {
            filters: vec![listener::Filter {
                name: "envoy.filters.network.http_connection_manager".into(),
                config_type: Some(listener::filter::ConfigType::TypedConfig(any(HCM_TYPE, &manager))),
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    xds::decode_listener(&l.encode_to_vec(), &Metrics::default(), &SecretRegistry::default())
}

fn filters(config: &ListenerConfig) -> &[HttpFilter] {
    let NetworkHandler::Http(settings) = &config.filter_chains[0].handler else { panic!("not HTTP") };
    &settings.filters
}

fn refused<T: std::fmt::Debug>(result: Result<T, ConfigError>, field: &str, reason_part: &str) {
    let error = result.expect_err("should be refused");
    assert_eq!(error.field, field, "{error}");
    assert!(error.reason.contains(reason_part), "{error}");
}

const AT: &str = "filter_chains[0].filters[0].typed_config.http_filters[0]";

#[test]
fn defaults_follow_envoy() {
    let config = listener_with(vec![global(|_| {})]).unwrap();
    let [HttpFilter::GlobalRateLimit { name, index, config }] = filters(&config) else { panic!("one global filter") };
    assert_eq!((name.as_str(), *index), ("envoy.filters.http.ratelimit", 0));
    assert_eq!((config.domain.as_str(), config.cluster.as_str()), ("mesh", "rls"));
    assert_eq!(config.timeout, Duration::from_millis(20));
    assert!(!config.failure_mode_deny);
    assert_eq!(config.request_type, RequestType::Both);
    assert_eq!((config.rate_limited_status.as_u16(), config.status_on_error.as_u16()), (429, 500));
}

#[test]
fn settings_decode() {
    let config = listener_with(vec![global(|c| {
        c.timeout = Some(ProtoDuration { seconds: 0, nanos: 100_000_000 });
        c.failure_mode_deny = true;
        c.request_type = "external".into();
        c.rate_limited_status = Some(HttpStatus { code: 503 });
        c.status_on_error = Some(HttpStatus { code: 502 });
    })])
    .unwrap();
    let [HttpFilter::GlobalRateLimit { config, .. }] = filters(&config) else { panic!("one global filter") };
    assert_eq!(config.timeout, Duration::from_millis(100));
    assert!(config.failure_mode_deny);
    assert_eq!(config.request_type, RequestType::External);
    assert_eq!((config.rate_limited_status.as_u16(), config.status_on_error.as_u16()), (503, 502));
}

#[test]
fn what_meshctl_does_not_do_is_refused_by_field() {
    refused(listener_with(vec![global(|c| c.domain.clear())]), &format!("{AT}.typed_config.domain"), "required");
    refused(listener_with(vec![global(|c| c.stage = 11)]), &format!("{AT}.typed_config.stage"), "more than 10");
    refused(listener_with(vec![global(|c| c.request_type = "sometimes".into())]), &format!("{AT}.typed_config.request_type"), "internal");
    refused(listener_with(vec![global(|c| c.enable_x_ratelimit_headers = 1)]), &format!("{AT}.typed_config.enable_x_ratelimit_headers"), "DRAFT_VERSION_03");
    refused(listener_with(vec![global(|c| c.rate_limit_service = None)]), &format!("{AT}.typed_config.rate_limit_service"), "required");
    refused(
        listener_with(vec![global(|c| {
            let grpc = c.rate_limit_service.as_mut().unwrap().grpc_service.as_mut().unwrap();
            grpc.target_specifier = Some(core::grpc_service::TargetSpecifier::GoogleGrpc(Default::default()));
        })]),
        &format!("{AT}.typed_config.rate_limit_service.grpc_service.google_grpc"),
        "envoy_grpc",
    );
    refused(
        listener_with(vec![global(|c| c.rate_limit_service.as_mut().unwrap().transport_api_version = core::ApiVersion::Auto as i32)]),
        &format!("{AT}.typed_config.rate_limit_service.transport_api_version"),
        "V3",
    );
}

#[test]
fn local_rate_limit_instances_keep_their_order_and_may_share_a_name_as_in_envoy() {
    let local = |name: &str, prefix: &str| {
        filter(name, LRL_TYPE, &lrl::LocalRateLimit { stat_prefix: prefix.into(), ..Default::default() })
    };
    let config = listener_with(vec![local("a", "first"), global(|_| {}), local("b", "second")]).unwrap();
    let names: Vec<&str> = filters(&config)
        .iter()
        .map(|f| match f {
            HttpFilter::LocalRateLimit { name, .. } | HttpFilter::GlobalRateLimit { name, .. } => name.as_str(),
            HttpFilter::Fault => "fault",
            HttpFilter::AdaptiveConcurrency { .. } => "adaptive_concurrency",
        })
        .collect();
    assert_eq!(names, ["a", "envoy.filters.http.ratelimit", "b"]);
    assert_eq!(filters(&listener_with(vec![local("a", "first"), local("a", "second")]).unwrap()).len(), 2);
    refused(listener_with(vec![local("", "first")]), "filter_chains[0].filters[0].typed_config.http_filters[0].name", "required");
}
