//! The local rate limit filter (connection manager, route config, virtual host, route) and
//! rate_limits actions: decoded with Envoy's defaults, or refused naming the field.

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::route::v3 as route;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3 as common;
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3 as lrl;
use envoy_types::pb::envoy::r#type::v3::{fractional_percent::DenominatorType, FractionalPercent, HttpStatus, TokenBucket};
use envoy_types::pb::google::protobuf::{Any, Duration as ProtoDuration, UInt32Value};
use meshctl_engine::model::fault::Share;
use meshctl_engine::model::local_ratelimit::{RateLimitAction, VhRateLimits};
use meshctl_engine::model::RouteConfig;
use meshctl_engine::telemetry::metrics::Metrics;
use meshctl_engine::xds::{self, ConfigError};
use prost::Message;
use std::time::Duration;

const LRL_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit";
const KEY: &str = "envoy.filters.http.local_ratelimit";

fn bucket(max_tokens: u32, millis: i64) -> Option<TokenBucket> {
    Some(TokenBucket {
        max_tokens,
        tokens_per_fill: None,
        fill_interval: Some(ProtoDuration { seconds: millis / 1000, nanos: ((millis % 1000) * 1_000_000) as i32 }),
    })
}

fn config(configure: impl FnOnce(&mut lrl::LocalRateLimit)) -> Any {
    let mut c = lrl::LocalRateLimit { stat_prefix: "p".into(), token_bucket: bucket(5, 1000), ..Default::default() };
    configure(&mut c);
    Any { type_url: LRL_TYPE.into(), value: c.encode_to_vec() }
}

fn table(configure: impl FnOnce(&mut route::RouteConfiguration)) -> Result<RouteConfig, ConfigError> {
    let r = route::Route {
        r#match: Some(route::RouteMatch { path_specifier: Some(route::route_match::PathSpecifier::Prefix("/".into())), ..Default::default() }),
        action: Some(route::route::Action::Route(route::RouteAction {
            cluster_specifier: Some(route::route_action::ClusterSpecifier::Cluster("c".into())),
            ..Default::default()
        })),
        ..Default::default()
    };
    let mut rc = route::RouteConfiguration {
        name: "t".into(),
        virtual_hosts: vec![route::VirtualHost { name: "v".into(), domains: vec!["*".into()], routes: vec![r], ..Default::default() }],
        ..Default::default()
    };
    configure(&mut rc);
    xds::decode_route_configuration(&rc.encode_to_vec(), &Metrics::default())
}

fn refused<T: std::fmt::Debug>(result: Result<T, ConfigError>, field: &str, reason_part: &str) {
    let error = result.expect_err("should be refused");
    assert_eq!(error.field, field, "{error}");
    assert!(error.reason.contains(reason_part), "{error}");
}

#[test]
fn defaults_follow_envoy() {
    let decoded = table(|rc| {
        rc.virtual_hosts[0].routes[0].typed_per_filter_config.insert(KEY.into(), config(|_| {}));
    })
    .unwrap();
    let c = decoded.virtual_hosts[0].routes[0].local_rate_limit(KEY).expect("decoded");
    let b = c.token_bucket.unwrap();
    assert_eq!((b.max_tokens, b.tokens_per_fill, b.fill_interval), (5, 1, Duration::from_secs(1)));
    // No filter_enabled: off; no filter_enforced: shadow; no status: 429.
    assert_eq!((c.enabled, c.enforced), (Share::NONE, Share::NONE));
    assert_eq!(c.status.as_u16(), 429);
    assert!(c.always_consume_default);
    assert_eq!(c.vh_rate_limits, VhRateLimits::Override);
}

#[test]
fn the_most_specific_config_wins_and_route_configs_reach_every_route() {
    let decoded = table(|rc| {
        rc.typed_per_filter_config.insert(KEY.into(), config(|c| c.stat_prefix = "rc".into()));
        let vh = rc.virtual_hosts[0].clone();
        let mut own = vh.clone();
        own.name = "own".into();
        own.domains = vec!["own".into()];
        own.typed_per_filter_config.insert(KEY.into(), config(|c| c.stat_prefix = "vh".into()));
        own.routes[0].typed_per_filter_config.insert(KEY.into(), config(|c| {
            c.stat_prefix = "route".into();
            c.status = Some(HttpStatus { code: 503 });
            c.filter_enabled = Some(core::RuntimeFractionalPercent {
                default_value: Some(FractionalPercent { numerator: 50, denominator: DenominatorType::Hundred as i32 }),
                runtime_key: "k".into(),
            });
        }));
        own.routes.push(vh.routes[0].clone());
        rc.virtual_hosts.push(own);
    })
    .unwrap();
    let prefix = |vh: usize, r: usize| decoded.virtual_hosts[vh].routes[r].local_rate_limit(KEY).unwrap().stat_prefix.clone();
    assert_eq!(prefix(0, 0), "rc");
    assert_eq!(prefix(1, 0), "route");
    assert_eq!(prefix(1, 1), "vh");
    let route_config = decoded.virtual_hosts[1].routes[0].local_rate_limit(KEY).unwrap();
    assert_eq!(route_config.status.as_u16(), 503);
    assert_eq!(route_config.enabled, Share { per_million: 500_000 });
}

#[test]
fn per_filter_configs_are_kept_by_filter_name_most_specific_per_name() {
    let decoded = table(|rc| {
        rc.typed_per_filter_config.insert(KEY.into(), config(|c| c.stat_prefix = "rc".into()));
        rc.typed_per_filter_config.insert("shadow".into(), config(|c| c.stat_prefix = "rc-shadow".into()));
        rc.virtual_hosts[0].typed_per_filter_config.insert("shadow".into(), config(|c| c.stat_prefix = "vh-shadow".into()));
        rc.virtual_hosts[0].routes[0].typed_per_filter_config.insert("nobody".into(), config(|c| c.stat_prefix = "r-nobody".into()));
    })
    .unwrap();
    let route = &decoded.virtual_hosts[0].routes[0];
    let prefix = |name: &str| route.local_rate_limit(name).map(|c| c.stat_prefix.clone());
    assert_eq!(prefix(KEY).as_deref(), Some("rc"));
    assert_eq!(prefix("shadow").as_deref(), Some("vh-shadow"));
    // Kept under a name no filter may have: never looked up.
    assert_eq!(prefix("nobody").as_deref(), Some("r-nobody"));
    assert_eq!(prefix("other"), None);
}

#[test]
fn rate_limit_actions_decode_with_envoys_keys() {
    use route::rate_limit::action::{ActionSpecifier as A, GenericKey, HeaderValueMatch, RequestHeaders};
    let action = |a| route::rate_limit::Action { action_specifier: Some(a) };
    let decoded = table(|rc| {
        rc.virtual_hosts[0].rate_limits = vec![route::RateLimit {
            stage: Some(UInt32Value { value: 1 }),
            actions: vec![
                action(A::RequestHeaders(RequestHeaders { header_name: "X-Tier".into(), descriptor_key: "tier".into(), skip_if_absent: true })),
                action(A::GenericKey(GenericKey { descriptor_value: "v".into(), ..Default::default() })),
                action(A::HeaderValueMatch(HeaderValueMatch {
                    descriptor_value: "m".into(),
                    headers: vec![route::HeaderMatcher { name: "x".into(), ..Default::default() }],
                    ..Default::default()
                })),
                action(A::RemoteAddress(Default::default())),
                action(A::DestinationCluster(Default::default())),
            ],
            ..Default::default()
        }];
    })
    .unwrap();
    let policy = &decoded.virtual_hosts[0].rate_limits[0];
    assert_eq!(policy.stage, 1);
    assert!(matches!(&policy.actions[0], RateLimitAction::RequestHeaders { header_name, skip_if_absent: true, .. } if header_name == "x-tier"));
    assert!(matches!(&policy.actions[1], RateLimitAction::GenericKey { descriptor_key, .. } if descriptor_key == "generic_key"));
    assert!(matches!(&policy.actions[2], RateLimitAction::HeaderValueMatch { descriptor_key, expect_match: true, .. } if descriptor_key == "header_match"));
    assert!(matches!(policy.actions[3], RateLimitAction::RemoteAddress));
    assert!(matches!(policy.actions[4], RateLimitAction::DestinationCluster));
}

#[test]
fn unsupported_or_invalid_settings_are_refused_by_field() {
    let on_route = |any: Any| table(move |rc| {
        rc.virtual_hosts[0].routes[0].typed_per_filter_config.insert(KEY.into(), any);
    });
    let at = format!("virtual_hosts[0].routes[0].typed_per_filter_config[{KEY:?}]");
    refused(on_route(config(|c| c.token_bucket = None)), &format!("{at}.token_bucket"), "required");
    refused(on_route(config(|c| c.token_bucket = bucket(5, 10))), &format!("{at}.token_bucket.fill_interval"), "50ms");
    refused(
        on_route(config(|c| c.token_bucket.as_mut().unwrap().tokens_per_fill = Some(UInt32Value { value: 0 }))),
        &format!("{at}.token_bucket.tokens_per_fill"),
        "above 0",
    );
    refused(on_route(config(|c| c.enable_x_ratelimit_headers = 1)), &format!("{at}.enable_x_ratelimit_headers"), "DRAFT_VERSION_03");
    refused(on_route(config(|c| c.local_cluster_rate_limit = Some(Default::default()))), &format!("{at}.local_cluster_rate_limit"), "not supported");
    refused(on_route(config(|c| c.stat_prefix.clear())), &format!("{at}.stat_prefix"), "required");
    let descriptor = |value: &str| common::LocalRateLimitDescriptor {
        entries: vec![common::rate_limit_descriptor::Entry { key: "k".into(), value: value.into() }],
        token_bucket: bucket(1, 1000),
        shadow_mode: false,
    };
    refused(on_route(config(|c| c.descriptors = vec![descriptor("")])), &format!("{at}.descriptors[0].entries[0].value"), "dynamic");
    refused(
        on_route(config(|c| c.descriptors = vec![descriptor("a"), descriptor("a")])),
        &format!("{at}.descriptors[1]"),
        "duplicates",
    );
    refused(
        on_route(config(|c| c.descriptors = vec![common::LocalRateLimitDescriptor { shadow_mode: true, ..descriptor("a") }])),
        &format!("{at}.descriptors[0].shadow_mode"),
        "not supported",
    );
    let source_cluster = route::RateLimit {
        actions: vec![route::rate_limit::Action {
            action_specifier: Some(route::rate_limit::action::ActionSpecifier::SourceCluster(Default::default())),
        }],
        ..Default::default()
    };
    refused(
        table(|rc| rc.virtual_hosts[0].rate_limits = vec![source_cluster]),
        "virtual_hosts[0].rate_limits[0].actions[0].source_cluster",
        "not supported",
    );
    // Only the local rate limit filter's config is taken on a virtual host.
    refused(
        table(|rc| {
            rc.virtual_hosts[0].typed_per_filter_config.insert("f".into(), Any {
                type_url: "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault".into(),
                value: Vec::new(),
            });
        }),
        "virtual_hosts[0].typed_per_filter_config[\"f\"]",
        "not supported",
    );
}
