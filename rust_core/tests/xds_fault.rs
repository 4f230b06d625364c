//! The fault filter (on the connection manager and per route) and request mirror policies:
//! decoded into the model with Envoy's defaults, or refused with the field meshctl does not do.

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::listener::v3 as listener;
use envoy_types::pb::envoy::config::route::v3 as route;
use envoy_types::pb::envoy::extensions::filters::common::fault::v3 as common_fault;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3 as fault;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::r#type::v3::{fractional_percent::DenominatorType, FractionalPercent};
use envoy_types::pb::google::protobuf::{Any, Duration as ProtoDuration, UInt32Value};
use meshctl_engine::model::fault::{AbortStatus, Share};
use meshctl_engine::model::route::Action;
use meshctl_engine::model::secret::SecretRegistry;
use meshctl_engine::model::{ListenerConfig, NetworkHandler};
use meshctl_engine::telemetry::metrics::Metrics;
use meshctl_engine::xds::{self, ConfigError};
use prost::Message;
use std::time::Duration;

const FAULT_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault";
const HCM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const ROUTER_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";

fn any<M: Message>(type_url: &str, message: &M) -> Any {
    Any { type_url: type_url.into(), value: message.encode_to_vec() }
}

fn percent(numerator: u32, denominator: DenominatorType) -> Option<FractionalPercent> {
    Some(FractionalPercent { numerator, denominator: denominator as i32 })
}

fn http_filter(name: &str, type_url: &str, value: Vec<u8>) -> hcm::HttpFilter {
    hcm::HttpFilter {
        name: name.into(),
        config_type: Some(hcm::http_filter::ConfigType::TypedConfig(Any { type_url: type_url.into(), value })),
        ..Default::default()
    }
}

fn listener_with(filters: Vec<hcm::HttpFilter>) -> Result<ListenerConfig, ConfigError> {
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

fn router() -> hcm::HttpFilter {
    http_filter("envoy.filters.http.router", ROUTER_TYPE, Vec::new())
}

fn route_with(configure: impl FnOnce(&mut route::Route)) -> Result<meshctl_engine::model::RouteConfig, ConfigError> {
    let mut r = route::Route {
        r#match: Some(route::RouteMatch {
            path_specifier: Some(route::route_match::PathSpecifier::Prefix("/".into())),
            ..Default::default()
        }),
        action: Some(route::route::Action::Route(route::RouteAction {
            cluster_specifier: Some(route::route_action::ClusterSpecifier::Cluster("ratings".into())),
            ..Default::default()
        })),
        ..Default::default()
    };
    configure(&mut r);
    let config = route::RouteConfiguration {
        name: "table".into(),
        virtual_hosts: vec![route::VirtualHost { name: "v".into(), domains: vec!["*".into()], routes: vec![r], ..Default::default() }],
        ..Default::default()
    };
    xds::decode_route_configuration(&config.encode_to_vec(), &Metrics::default())
}

fn with_fault(http_fault: fault::HttpFault) -> impl FnOnce(&mut route::Route) {
    move |r| {
        r.typed_per_filter_config.insert("envoy.filters.http.fault".into(), any(FAULT_TYPE, &http_fault));
    }
}

fn fixed_delay(millis: i64, share: Option<FractionalPercent>) -> Option<common_fault::FaultDelay> {
    Some(common_fault::FaultDelay {
        percentage: share,
        fault_delay_secifier: Some(common_fault::fault_delay::FaultDelaySecifier::FixedDelay(ProtoDuration {
            seconds: millis / 1000,
            nanos: ((millis % 1000) * 1_000_000) as i32,
        })),
    })
}

fn abort(error: fault::fault_abort::ErrorType, share: Option<FractionalPercent>) -> Option<fault::FaultAbort> {
    Some(fault::FaultAbort { percentage: share, error_type: Some(error), ..Default::default() })
}

fn assert_refused<T: std::fmt::Debug>(result: Result<T, ConfigError>, field: &str, reason_part: &str) {
    let error = result.expect_err("should be refused");
    assert_eq!(error.field, field, "{error}");
    assert!(error.reason.contains(reason_part), "{error}");
}

#[test]
fn istios_empty_fault_filter_is_accepted_before_the_router() {
    let config = listener_with(vec![http_filter("envoy.filters.http.fault", FAULT_TYPE, Vec::new()), router()]).unwrap();
    let NetworkHandler::Http(settings) = &config.filter_chains[0].handler else { panic!("not HTTP") };
    assert!(settings.fault.as_ref().is_some_and(|f| f.is_empty()));
    let without = listener_with(vec![router()]).unwrap();
    let NetworkHandler::Http(settings) = &without.filter_chains[0].handler else { panic!("not HTTP") };
    assert!(settings.fault.is_none());
}

#[test]
fn a_routes_http_fault_lands_in_the_model_with_its_shares() {
    let decoded = route_with(with_fault(fault::HttpFault {
        delay: fixed_delay(1500, percent(100, DenominatorType::Hundred)),
        abort: abort(fault::fault_abort::ErrorType::HttpStatus(500), percent(500_000, DenominatorType::Million)),
        ..Default::default()
    }))
    .unwrap();
    let policy = decoded.virtual_hosts[0].routes[0].fault.as_ref().expect("fault decoded");
    let delay = policy.delay.as_ref().unwrap();
    assert_eq!(delay.duration, Duration::from_millis(1500));
    assert_eq!(delay.share, Share::ALL);
    let abort = policy.abort.as_ref().unwrap();
    assert!(matches!(abort.status, AbortStatus::Http(s) if s.as_u16() == 500));
    assert_eq!(abort.share, Share { per_million: 500_000 });
    assert_eq!(abort.body, "fault filter abort");
}

#[test]
fn grpc_aborts_missing_shares_and_oversized_numerators_follow_envoy() {
    let decoded = route_with(with_fault(fault::HttpFault {
        abort: abort(fault::fault_abort::ErrorType::GrpcStatus(14), percent(250, DenominatorType::TenThousand)),
        delay: fixed_delay(10, None),
        ..Default::default()
    }))
    .unwrap();
    let policy = decoded.virtual_hosts[0].routes[0].fault.as_ref().unwrap();
    assert!(matches!(policy.abort.as_ref().unwrap().status, AbortStatus::Grpc(14)));
    assert_eq!(policy.abort.as_ref().unwrap().share, Share { per_million: 25_000 });
    // No percentage: Envoy's numerator defaults to 0, so nothing is delayed.
    assert_eq!(policy.delay.as_ref().unwrap().share, Share::NONE);
    let capped = route_with(with_fault(fault::HttpFault {
        delay: fixed_delay(10, percent(150, DenominatorType::Hundred)),
        ..Default::default()
    }))
    .unwrap();
    assert_eq!(capped.virtual_hosts[0].routes[0].fault.as_ref().unwrap().delay.as_ref().unwrap().share, Share::ALL);
}

#[test]
fn unimplemented_fault_settings_are_refused_by_field() {
    let at = "virtual_hosts[0].routes[0].typed_per_filter_config[\"envoy.filters.http.fault\"]";
    assert_refused(
        route_with(with_fault(fault::HttpFault {
            delay: Some(common_fault::FaultDelay {
                percentage: percent(100, DenominatorType::Hundred),
                fault_delay_secifier: Some(common_fault::fault_delay::FaultDelaySecifier::HeaderDelay(Default::default())),
            }),
            ..Default::default()
        })),
        &format!("{at}.delay.header_delay"),
        "x-envoy-fault-delay-request",
    );
    assert_refused(
        route_with(with_fault(fault::HttpFault {
            abort: abort(fault::fault_abort::ErrorType::HeaderAbort(Default::default()), None),
            ..Default::default()
        })),
        &format!("{at}.abort.header_abort"),
        "x-envoy-fault-abort-request",
    );
    assert_refused(
        route_with(with_fault(fault::HttpFault { max_active_faults: Some(UInt32Value { value: 3 }), ..Default::default() })),
        &format!("{at}.max_active_faults"),
        "not supported",
    );
    assert_refused(
        route_with(with_fault(fault::HttpFault { headers: vec![Default::default()], ..Default::default() })),
        &format!("{at}.headers"),
        "not supported",
    );
    assert_refused(
        route_with(with_fault(fault::HttpFault {
            abort: abort(fault::fault_abort::ErrorType::HttpStatus(99), None),
            ..Default::default()
        })),
        &format!("{at}.abort.http_status"),
        "99 is not an HTTP status",
    );
    assert_refused(
        route_with(|r| {
            r.typed_per_filter_config.insert("envoy.filters.http.cors".into(), Any {
                type_url: "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy".into(),
                value: Vec::new(),
            });
        }),
        "virtual_hosts[0].routes[0].typed_per_filter_config[\"envoy.filters.http.cors\"]",
        "not supported by meshctl yet",
    );
    let disabled = hcm::HttpFilter { disabled: true, ..http_filter("envoy.filters.http.fault", FAULT_TYPE, Vec::new()) };
    assert_refused(
        listener_with(vec![disabled, router()]),
        "filter_chains[0].filters[0].typed_config.http_filters[0].disabled",
        "not supported",
    );
}

fn mirror(cluster: &str, share: Option<FractionalPercent>) -> route::route_action::RequestMirrorPolicy {
    route::route_action::RequestMirrorPolicy {
        cluster: cluster.into(),
        runtime_fraction: share.map(|s| core::RuntimeFractionalPercent { default_value: Some(s), runtime_key: String::new() }),
        ..Default::default()
    }
}

fn with_mirrors(policies: Vec<route::route_action::RequestMirrorPolicy>) -> impl FnOnce(&mut route::Route) {
    move |r| {
        if let Some(route::route::Action::Route(action)) = &mut r.action {
            action.request_mirror_policies = policies;
        }
    }
}

#[test]
fn mirror_policies_land_on_the_forward_action() {
    let decoded = route_with(with_mirrors(vec![
        mirror("v2", Some(FractionalPercent { numerator: 50, denominator: DenominatorType::Hundred as i32 })),
        mirror("v3", None),
    ]))
    .unwrap();
    let Action::Forward(forward) = &decoded.virtual_hosts[0].routes[0].action else { panic!("not forwarded") };
    assert_eq!(forward.mirrors.len(), 2);
    assert_eq!(forward.mirrors[0].cluster, "v2");
    assert_eq!(forward.mirrors[0].share, Share { per_million: 500_000 });
    assert!(forward.mirrors[0].shadow_host_suffix);
    // Without runtime_fraction Envoy mirrors every request.
    assert_eq!(forward.mirrors[1].share, Share::ALL);
}

#[test]
fn unimplemented_mirror_settings_are_refused_by_field() {
    let at = "virtual_hosts[0].routes[0].route.request_mirror_policies[0]";
    let by_header = route::route_action::RequestMirrorPolicy { cluster_header: "x-mirror".into(), ..Default::default() };
    assert_refused(route_with(with_mirrors(vec![by_header])), &format!("{at}.cluster"), "cluster_header is not supported");
    let rewritten = route::route_action::RequestMirrorPolicy { host_rewrite_literal: "x".into(), ..mirror("v2", None) };
    assert_refused(route_with(with_mirrors(vec![rewritten])), &format!("{at}.host_rewrite_literal"), "not supported");
}
