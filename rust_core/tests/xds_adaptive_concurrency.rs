//! The adaptive concurrency filter (envoy.filters.http.adaptive_concurrency) in a connection
//! manager: decoded with Envoy 1.40's defaults, or refused by field.

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::listener::v3 as listener;
use envoy_types::pb::envoy::config::route::v3 as route;
use envoy_types::pb::envoy::extensions::filters::http::adaptive_concurrency::v3 as ac;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::r#type::v3::{HttpStatus, Percent};
use envoy_types::pb::google::protobuf::{Any, BoolValue, Duration as ProtoDuration, UInt32Value};
use meshctl_engine::model::secret::SecretRegistry;
use meshctl_engine::model::{HttpFilter, ListenerConfig, NetworkHandler};
use meshctl_engine::policy::adaptive_concurrency::MinRttSource;
use meshctl_engine::telemetry::metrics::Metrics;
use meshctl_engine::xds::{self, ConfigError};
use prost::Message;
use std::time::Duration;

const AC_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.adaptive_concurrency.v3.AdaptiveConcurrency";
const HCM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const ROUTER_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";
const AT: &str = "filter_chains[0].filters[0].typed_config.http_filters[0].typed_config";

fn any<M: Message>(type_url: &str, message: &M) -> Any {
    Any { type_url: type_url.into(), value: message.encode_to_vec() }
}

fn filter(name: &str, typed: Any) -> hcm::HttpFilter {
    hcm::HttpFilter { name: name.into(), config_type: Some(hcm::http_filter::ConfigType::TypedConfig(typed)), ..Default::default() }
}

/// The smallest config Envoy accepts: an update interval and empty minRTT params.
fn minimal(configure: impl FnOnce(&mut ac::AdaptiveConcurrency, &mut ac::GradientControllerConfig)) -> hcm::HttpFilter {
    use ac::gradient_controller_config::{ConcurrencyLimitCalculationParams, MinimumRttCalculationParams};
    let mut gradient = ac::GradientControllerConfig {
        concurrency_limit_params: Some(ConcurrencyLimitCalculationParams {
            concurrency_update_interval: Some(ProtoDuration { seconds: 0, nanos: 100_000_000 }),
            ..Default::default()
        }),
        min_rtt_calc_params: Some(MinimumRttCalculationParams::default()),
        ..Default::default()
    };
    let mut config = ac::AdaptiveConcurrency::default();
    configure(&mut config, &mut gradient);
    config.concurrency_controller_config = Some(ac::adaptive_concurrency::ConcurrencyControllerConfig::GradientControllerConfig(gradient));
    filter("envoy.filters.http.adaptive_concurrency", any(AC_TYPE, &config))
}

fn listener_with(mut filters: Vec<hcm::HttpFilter>) -> Result<ListenerConfig, ConfigError> {
    filters.push(filter("envoy.filters.http.router", Any { type_url: ROUTER_TYPE.into(), value: vec![] }));
    let manager = hcm::HttpConnectionManager {
        stat_prefix: "inbound".into(),
        http_filters: filters,
        route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::RouteConfig(route::RouteConfiguration {
            name: "local".into(),
            ..Default::default()
        })),
        ..Default::default()
    };
    let l = listener::Listener {
        name: "inbound".into(),
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

fn adaptive(config: &ListenerConfig) -> &meshctl_engine::model::adaptive_concurrency::AdaptiveConcurrency {
    let NetworkHandler::Http(settings) = &config.filter_chains[0].handler else { panic!("not HTTP") };
    let [HttpFilter::AdaptiveConcurrency { config }] = settings.filters.as_slice() else { panic!("one adaptive filter") };
    config
}

fn refused<T: std::fmt::Debug>(result: Result<T, ConfigError>, field: &str, reason_part: &str) {
    let error = result.expect_err("should be refused");
    assert_eq!(error.field, field, "{error}");
    assert!(error.reason.contains(reason_part), "{error}");
}

#[test]
fn envoys_defaults_apply() {
    let config = listener_with(vec![minimal(|_, _| {})]).unwrap();
    let decoded = adaptive(&config);
    assert!(decoded.enabled);
    assert_eq!(decoded.limit_exceeded_status, 503);
    let g = &decoded.gradient;
    assert_eq!((g.percentile, g.max_limit, g.min_limit, g.min_concurrency, g.buffer), (0.5, 1000, 3, 3, 0.25));
    assert_eq!(g.update_interval, Duration::from_millis(100));
    let MinRttSource::Sampled { interval, request_count, jitter } = g.min_rtt else { panic!("sampled") };
    assert_eq!((interval, request_count, jitter), (Duration::from_secs(60), 50, 0.15));
    // The limit starts at min_concurrency while the first minimum RTT is measured.
    assert_eq!(decoded.controller.limit(), 3);
}

#[test]
fn a_fixed_min_rtt_a_disabled_flag_and_a_custom_status() {
    let config = listener_with(vec![minimal(|c, g| {
        c.enabled = Some(core::RuntimeFeatureFlag { default_value: Some(BoolValue { value: false }), runtime_key: "ac".into() });
        c.concurrency_limit_exceeded_status = Some(HttpStatus { code: 429 });
        let rtt = g.min_rtt_calc_params.as_mut().unwrap();
        rtt.interval = Some(ProtoDuration::default());
        rtt.fixed_value = Some(ProtoDuration { seconds: 0, nanos: 20_000_000 });
        rtt.min_concurrency = Some(UInt32Value { value: 5 });
        g.sample_aggregate_percentile = Some(Percent { value: 90.0 });
    })])
    .unwrap();
    let decoded = adaptive(&config);
    assert!(!decoded.enabled);
    assert_eq!(decoded.limit_exceeded_status, 429);
    assert_eq!(decoded.gradient.percentile, 0.9);
    assert!(matches!(decoded.gradient.min_rtt, MinRttSource::Fixed { value } if value == Duration::from_millis(20)));
    assert_eq!(decoded.controller.limit(), 5);
    // A status below 400 is Envoy's 503.
    let config = listener_with(vec![minimal(|c, _| c.concurrency_limit_exceeded_status = Some(HttpStatus { code: 200 }))]).unwrap();
    assert_eq!(adaptive(&config).limit_exceeded_status, 503);
}

#[test]
fn bad_configs_are_refused_by_field() {
    let without_controller = filter("envoy.filters.http.adaptive_concurrency", any(AC_TYPE, &ac::AdaptiveConcurrency::default()));
    refused(listener_with(vec![without_controller]), &format!("{AT}.gradient_controller_config"), "required");
    refused(
        listener_with(vec![minimal(|_, g| g.concurrency_limit_params.as_mut().unwrap().concurrency_update_interval = None)]),
        &format!("{AT}.gradient_controller_config.concurrency_limit_params.concurrency_update_interval"),
        "required",
    );
    refused(
        listener_with(vec![minimal(|_, g| g.sample_aggregate_percentile = Some(Percent { value: 101.0 }))]),
        &format!("{AT}.gradient_controller_config.sample_aggregate_percentile.value"),
        "between 0 and 100",
    );
    refused(
        listener_with(vec![minimal(|_, g| g.min_rtt_calc_params.as_mut().unwrap().request_count = Some(UInt32Value { value: 0 }))]),
        &format!("{AT}.gradient_controller_config.min_rtt_calc_params.request_count"),
        "above 0",
    );
    refused(
        listener_with(vec![minimal(|_, g| g.min_rtt_calc_params.as_mut().unwrap().interval = Some(ProtoDuration::default()))]),
        &format!("{AT}.gradient_controller_config.min_rtt_calc_params.fixed_value"),
        "must be set",
    );
    refused(
        listener_with(vec![minimal(|_, _| {}), minimal(|_, _| {})]),
        "filter_chains[0].filters[0].typed_config.http_filters[1]",
        "one adaptive concurrency filter",
    );
}
