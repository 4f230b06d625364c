//! The xDS decoder: valid resources become the model; refused ones name the resource and field.

use envoy_types::pb::envoy::config::cluster::v3 as cluster;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::route::v3 as route;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use envoy_types::pb::google::protobuf::{BoolValue, UInt32Value};
use std::time::Duration;
use http::{HeaderMap, Method};
use meshctl_engine::http::routing::{select_route, select_virtual_host, RequestView};
use meshctl_engine::model::route::{Action, ClusterChoice};
use meshctl_engine::telemetry::metrics::Metrics;
use meshctl_engine::xds;
use prost::Message;

mod common;
use common::static_cluster;

fn forward_to(cluster_name: &str) -> Option<route::route::Action> {
    Some(route::route::Action::Route(route::RouteAction {
        cluster_specifier: Some(route::route_action::ClusterSpecifier::Cluster(cluster_name.into())),
        ..Default::default()
    }))
}

fn prefix_route(prefix: &str, cluster_name: &str) -> route::Route {
    route::Route {
        r#match: Some(route::RouteMatch {
            path_specifier: Some(route::route_match::PathSpecifier::Prefix(prefix.into())),
            ..Default::default()
        }),
        action: forward_to(cluster_name),
        ..Default::default()
    }
}

fn vhost(name: &str, domains: &[&str], routes: Vec<route::Route>) -> route::VirtualHost {
    route::VirtualHost { name: name.into(), domains: domains.iter().map(|d| d.to_string()).collect(), routes, ..Default::default() }
}

fn route_config(virtual_hosts: Vec<route::VirtualHost>) -> route::RouteConfiguration {
    route::RouteConfiguration { name: "table".into(), virtual_hosts, ..Default::default() }
}

fn decode_routes(config: &route::RouteConfiguration) -> Result<meshctl_engine::model::RouteConfig, xds::ConfigError> {
    xds::decode_route_configuration(&config.encode_to_vec(), &Metrics::default())
}

fn chosen_cluster(config: &meshctl_engine::model::RouteConfig, host: &str, path: &str, headers: &HeaderMap) -> Option<String> {
    let vhost = select_virtual_host(config, host)?;
    let view = RequestView { method: &Method::GET, path_and_query: path, authority: host, scheme: "http", headers };
    match &select_route(vhost, &view)?.action {
        Action::Forward(forward) => match &forward.clusters {
            ClusterChoice::Single { name } => Some(name.clone()),
            ClusterChoice::Weighted(_) => Some("weighted".into()),
        },
        _ => None,
    }
}

#[test]
fn virtual_hosts_are_chosen_exact_then_suffix_then_prefix_then_wildcard() {
    let config = decode_routes(&route_config(vec![
        vhost("exact", &["api.example.com", "api.example.com:8080"], vec![prefix_route("/", "exact")]),
        vhost("suffix", &["*.example.com"], vec![prefix_route("/", "suffix")]),
        vhost("longer-suffix", &["*.api.example.com"], vec![prefix_route("/", "longer-suffix")]),
        vhost("prefix", &["api.*"], vec![prefix_route("/", "prefix")]),
        vhost("any", &["*"], vec![prefix_route("/", "any")]),
    ]))
    .unwrap();
    let none = HeaderMap::new();
    assert_eq!(chosen_cluster(&config, "api.example.com", "/", &none).unwrap(), "exact");
    assert_eq!(chosen_cluster(&config, "API.Example.com:8080", "/", &none).unwrap(), "exact");
    assert_eq!(chosen_cluster(&config, "v1.api.example.com", "/", &none).unwrap(), "longer-suffix");
    assert_eq!(chosen_cluster(&config, "www.example.com", "/", &none).unwrap(), "suffix");
    assert_eq!(chosen_cluster(&config, "api.other.org", "/", &none).unwrap(), "prefix");
    assert_eq!(chosen_cluster(&config, "example.com", "/", &none).unwrap(), "any");
    // The host with a port matches only domains written with that port.
    assert_eq!(chosen_cluster(&config, "www.example.com:9090", "/", &none).unwrap(), "any");
}

#[test]
fn routes_match_in_order_on_path_headers_and_query() {
    let mut by_header = prefix_route("/", "by-header");
    by_header.r#match.as_mut().unwrap().headers = vec![route::HeaderMatcher {
        name: "end-user".into(),
        header_match_specifier: Some(route::header_matcher::HeaderMatchSpecifier::StringMatch(matcher::StringMatcher {
            match_pattern: Some(matcher::string_matcher::MatchPattern::Exact("jason".into())),
            ignore_case: false,
        })),
        ..Default::default()
    }];
    let mut by_query = prefix_route("/", "by-query");
    by_query.r#match.as_mut().unwrap().query_parameters =
        vec![route::QueryParameterMatcher { name: "debug".into(), query_parameter_match_specifier: None }];
    let exact = route::Route {
        r#match: Some(route::RouteMatch {
            path_specifier: Some(route::route_match::PathSpecifier::Path("/exact".into())),
            ..Default::default()
        }),
        action: forward_to("exact"),
        ..Default::default()
    };
    let regex = route::Route {
        r#match: Some(route::RouteMatch {
            path_specifier: Some(route::route_match::PathSpecifier::SafeRegex(matcher::RegexMatcher {
                regex: "/items/[0-9]+".into(),
                ..Default::default()
            })),
            ..Default::default()
        }),
        action: forward_to("regex"),
        ..Default::default()
    };
    let config = decode_routes(&route_config(vec![vhost(
        "all",
        &["*"],
        vec![exact, regex, by_header, by_query, prefix_route("/", "default")],
    )]))
    .unwrap();
    let mut jason = HeaderMap::new();
    jason.insert("end-user", "jason".parse().unwrap());
    let none = HeaderMap::new();
    assert_eq!(chosen_cluster(&config, "h", "/exact", &none).unwrap(), "exact");
    assert_eq!(chosen_cluster(&config, "h", "/exact/more", &none).unwrap(), "default");
    assert_eq!(chosen_cluster(&config, "h", "/items/42", &none).unwrap(), "regex");
    // Regexes must match the whole path.
    assert_eq!(chosen_cluster(&config, "h", "/items/42/x", &none).unwrap(), "default");
    assert_eq!(chosen_cluster(&config, "h", "/anything", &jason).unwrap(), "by-header");
    assert_eq!(chosen_cluster(&config, "h", "/anything?debug=1", &none).unwrap(), "by-query");
    assert_eq!(chosen_cluster(&config, "h", "/anything?nodebug=1", &none).unwrap(), "default");
}

fn assert_refused(result: Result<impl std::fmt::Debug, xds::ConfigError>, resource: &str, field: &str, reason_part: &str) {
    let error = result.expect_err("the resource should have been refused");
    assert_eq!(error.resource, resource, "{error}");
    assert_eq!(error.field, field, "{error}");
    assert!(error.reason.contains(reason_part), "{error}");
}

#[test]
fn weights_summing_to_zero_are_refused() {
    let mut r = prefix_route("/", "unused");
    r.action = Some(route::route::Action::Route(route::RouteAction {
        cluster_specifier: Some(route::route_action::ClusterSpecifier::WeightedClusters(route::WeightedCluster {
            clusters: vec![route::weighted_cluster::ClusterWeight {
                name: "a".into(),
                weight: Some(UInt32Value { value: 0 }),
                ..Default::default()
            }],
            ..Default::default()
        })),
        ..Default::default()
    }));
    assert_refused(
        decode_routes(&route_config(vec![vhost("v", &["*"], vec![r])])),
        "RouteConfiguration \"table\"",
        "virtual_hosts[0].routes[0].route.weighted_clusters.clusters",
        "sum to 0",
    );
}

#[test]
fn an_invalid_regex_is_refused_with_its_field() {
    let r = route::Route {
        r#match: Some(route::RouteMatch {
            path_specifier: Some(route::route_match::PathSpecifier::SafeRegex(matcher::RegexMatcher {
                regex: "/(unclosed".into(),
                ..Default::default()
            })),
            ..Default::default()
        }),
        action: forward_to("c"),
        ..Default::default()
    };
    assert_refused(
        decode_routes(&route_config(vec![vhost("v", &["*"], vec![r])])),
        "RouteConfiguration \"table\"",
        "virtual_hosts[0].routes[0].match.safe_regex.regex",
        "invalid regex",
    );
}

#[test]
fn unsupported_behaviour_is_refused_not_dropped() {
    let mut r = prefix_route("/", "c");
    if let Some(route::route::Action::Route(action)) = &mut r.action {
        action.hedge_policy = Some(Default::default());
    }
    assert_refused(
        decode_routes(&route_config(vec![vhost("v", &["*"], vec![r])])),
        "RouteConfiguration \"table\"",
        "virtual_hosts[0].routes[0].route.hedge_policy",
        "not supported",
    );
}

#[test]
fn a_domain_listed_twice_is_refused() {
    assert_refused(
        decode_routes(&route_config(vec![
            vhost("one", &["a.example.com"], vec![prefix_route("/", "c")]),
            vhost("two", &["a.example.com"], vec![prefix_route("/", "c")]),
        ])),
        "RouteConfiguration \"table\"",
        "virtual_hosts[1].domains[0]",
        "two virtual hosts",
    );
}


#[test]
fn clusters_decode_and_bad_ports_are_refused() {
    let decoded = xds::decode_cluster(&static_cluster("web", 8080).encode_to_vec(), &Default::default()).unwrap();
    assert_eq!(decoded.name, "web");
    assert_eq!(decoded.connect_timeout, std::time::Duration::from_secs(5));
    assert_refused(
        xds::decode_cluster(&static_cluster("web", 70000).encode_to_vec(), &Default::default()),
        "Cluster \"web\"",
        "load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value",
        "70000 is not a port",
    );
}

#[test]
fn unsupported_load_balancers_and_health_checks_are_refused() {
    let mut ring_hash = static_cluster("web", 8080);
    ring_hash.lb_policy = cluster::cluster::LbPolicy::RingHash as i32;
    assert_refused(xds::decode_cluster(&ring_hash.encode_to_vec(), &Default::default()), "Cluster \"web\"", "lb_policy", "RING_HASH");
    let mut checked = static_cluster("web", 8080);
    checked.health_checks = vec![Default::default()];
    assert_refused(xds::decode_cluster(&checked.encode_to_vec(), &Default::default()), "Cluster \"web\"", "health_checks", "not supported");
}

#[test]
fn endpoint_assignments_keep_unhealthy_hosts_drop_draining_ones_and_refuse_priorities() {
    use meshctl_engine::model::cluster::HealthStatus;
    let mut assignment = static_cluster("web", 8080).load_assignment.unwrap();
    let mut unhealthy = assignment.endpoints[0].lb_endpoints[0].clone();
    unhealthy.health_status = core::HealthStatus::Unhealthy as i32;
    let mut draining = unhealthy.clone();
    draining.health_status = core::HealthStatus::Draining as i32;
    assignment.endpoints[0].lb_endpoints.extend([unhealthy, draining]);
    let decoded = xds::decode_cluster_load_assignment(&assignment.encode_to_vec()).unwrap();
    // As Envoy: an unhealthy host stays (for the panic threshold), a draining one takes no part.
    let health: Vec<_> = decoded.endpoints.iter().map(|e| e.health_status).collect();
    assert_eq!(health, vec![HealthStatus::Healthy, HealthStatus::Unhealthy]);
    assignment.endpoints[0].priority = 1;
    assert_refused(
        xds::decode_cluster_load_assignment(&assignment.encode_to_vec()),
        "ClusterLoadAssignment \"web\"",
        "endpoints[0].priority",
        "not supported",
    );
}

#[test]
fn case_insensitive_prefixes_match_any_case() {
    let mut r = prefix_route("/API", "api");
    r.r#match.as_mut().unwrap().case_sensitive = Some(BoolValue { value: false });
    let config = decode_routes(&route_config(vec![vhost("v", &["*"], vec![r])])).unwrap();
    assert_eq!(chosen_cluster(&config, "h", "/api/x", &HeaderMap::new()).unwrap(), "api");
    assert_eq!(chosen_cluster(&config, "h", "/Api", &HeaderMap::new()).unwrap(), "api");
}

#[test]
fn a_connect_request_matches_no_ordinary_route() {
    // Envoy routes CONNECT only by connect_matcher (refused by meshctl); `/` must not catch it.
    let config = decode_routes(&route_config(vec![vhost("v", &["*"], vec![prefix_route("/", "c")])])).unwrap();
    let headers = HeaderMap::new();
    let vhost = select_virtual_host(&config, "svc.test:80").unwrap();
    let connect = RequestView { method: &Method::CONNECT, path_and_query: "/", authority: "svc.test:80", scheme: "http", headers: &headers };
    assert!(select_route(vhost, &connect).is_none());
    let get = RequestView { method: &Method::GET, ..connect };
    assert!(select_route(vhost, &get).is_some());
}

#[test]
fn connect_upgrades_and_connect_matchers_are_refused_by_field() {
    let mut r = prefix_route("/", "c");
    if let Some(route::route::Action::Route(action)) = &mut r.action {
        action.upgrade_configs = vec![route::route_action::UpgradeConfig { upgrade_type: "CONNECT".into(), ..Default::default() }];
    }
    assert_refused(
        decode_routes(&route_config(vec![vhost("v", &["*"], vec![r])])),
        "RouteConfiguration \"table\"",
        "virtual_hosts[0].routes[0].route.upgrade_configs[0].upgrade_type",
        "CONNECT is not supported by meshctl yet",
    );
    let connect_route = route::Route {
        r#match: Some(route::RouteMatch {
            path_specifier: Some(route::route_match::PathSpecifier::ConnectMatcher(Default::default())),
            ..Default::default()
        }),
        action: forward_to("c"),
        ..Default::default()
    };
    assert_refused(
        decode_routes(&route_config(vec![vhost("v", &["*"], vec![connect_route])])),
        "RouteConfiguration \"table\"",
        "virtual_hosts[0].routes[0].match.connect_matcher",
        "not supported by meshctl yet",
    );
}


fn retrying_route(policy: route::RetryPolicy) -> route::Route {
    let mut r = prefix_route("/", "c");
    if let Some(route::route::Action::Route(action)) = &mut r.action {
        action.retry_policy = Some(policy);
    }
    r
}

fn forward_of(config: &meshctl_engine::model::RouteConfig, route: usize) -> &meshctl_engine::model::route::ForwardAction {
    match &config.virtual_hosts[0].routes[route].action {
        Action::Forward(forward) => forward,
        other => panic!("not a forward action: {other:?}"),
    }
}

fn proto_duration(millis: i64) -> envoy_types::pb::google::protobuf::Duration {
    envoy_types::pb::google::protobuf::Duration { seconds: millis / 1000, nanos: ((millis % 1000) * 1_000_000) as i32 }
}

#[test]
fn retry_policies_land_in_the_model_with_envoys_defaults() {
    use meshctl_engine::model::retry::RetryOn;
    let policy = route::RetryPolicy {
        retry_on: "5xx, connect-failure,retriable-status-codes,unavailable".into(),
        retriable_status_codes: vec![409, 418],
        num_retries: Some(UInt32Value { value: 3 }),
        per_try_timeout: Some(proto_duration(250)),
        retry_host_predicate: vec![route::retry_policy::RetryHostPredicate {
            name: "envoy.retry_host_predicates.previous_hosts".into(),
            config_type: Some(route::retry_policy::retry_host_predicate::ConfigType::TypedConfig(
                envoy_types::pb::google::protobuf::Any {
                    type_url: "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate".into(),
                    value: vec![],
                },
            )),
        }],
        host_selection_retry_max_attempts: 5,
        retry_back_off: Some(route::retry_policy::RetryBackOff { base_interval: Some(proto_duration(10)), max_interval: None }),
        ..Default::default()
    };
    let config = decode_routes(&route_config(vec![vhost("v", &["*"], vec![retrying_route(policy)])])).unwrap();
    let forward = forward_of(&config, 0);
    let decoded = forward.retry_policy.as_ref().expect("the route's retry policy");
    assert!(decoded.retry_on.contains(RetryOn::SERVER_ERROR));
    assert!(decoded.retry_on.contains(RetryOn::CONNECT_FAILURE));
    assert!(decoded.retry_on.contains(RetryOn::RETRIABLE_STATUS_CODES));
    assert!(decoded.retry_on.contains(RetryOn::GRPC_UNAVAILABLE));
    assert!(!decoded.retry_on.contains(RetryOn::RESET));
    assert_eq!(decoded.retriable_status_codes, vec![409, 418]);
    assert_eq!(decoded.num_retries, 3);
    assert_eq!(decoded.per_try_timeout, Some(Duration::from_millis(250)));
    assert!(decoded.avoid_previous_hosts);
    assert_eq!(decoded.host_selection_retry_max_attempts, 5);
    assert_eq!(decoded.backoff.base_interval, Duration::from_millis(10));
    // Envoy: the maximum defaults to ten times the base.
    assert_eq!(decoded.backoff.max_interval, Duration::from_millis(100));
    assert_eq!(forward.retry_buffer_limit, 64 * 1024);

    // Unset: one retry, 25 ms base, 250 ms maximum, no per-try timeout.
    let config = decode_routes(&route_config(vec![vhost(
        "v",
        &["*"],
        vec![retrying_route(route::RetryPolicy { retry_on: "reset".into(), ..Default::default() })],
    )]))
    .unwrap();
    let decoded = forward_of(&config, 0).retry_policy.as_ref().unwrap();
    assert_eq!(decoded.num_retries, 1);
    assert_eq!(decoded.per_try_timeout, None);
    assert!(!decoded.avoid_previous_hosts);
    assert_eq!(decoded.backoff.base_interval, Duration::from_millis(25));
    assert_eq!(decoded.backoff.max_interval, Duration::from_millis(250));
}

#[test]
#[allow(deprecated)] // per_request_buffer_limit_bytes: Envoy still honours it.
fn a_routes_retry_policy_wins_whole_over_its_virtual_hosts() {
    let mut v = vhost("v", &["*"], vec![
        retrying_route(route::RetryPolicy { retry_on: "reset".into(), ..Default::default() }),
        prefix_route("/other", "c"),
    ]);
    v.retry_policy = Some(route::RetryPolicy {
        retry_on: "5xx".into(),
        num_retries: Some(UInt32Value { value: 4 }),
        ..Default::default()
    });
    v.per_request_buffer_limit_bytes = Some(UInt32Value { value: 1000 });
    v.include_request_attempt_count = true;
    let config = decode_routes(&route_config(vec![v])).unwrap();
    let own = forward_of(&config, 0).retry_policy.as_ref().unwrap();
    assert_eq!(own.num_retries, 1, "not merged with the virtual host's 4");
    assert!(own.retry_on.contains(meshctl_engine::model::retry::RetryOn::RESET));
    assert!(!own.retry_on.contains(meshctl_engine::model::retry::RetryOn::SERVER_ERROR));
    let inherited = forward_of(&config, 1).retry_policy.as_ref().unwrap();
    assert_eq!(inherited.num_retries, 4);
    assert_eq!(forward_of(&config, 1).retry_buffer_limit, 1000);
    assert!(config.virtual_hosts[0].include_request_attempt_count);
}

#[test]
fn unsupported_retry_settings_are_refused_with_their_path() {
    let cases: Vec<(route::RetryPolicy, &str, &str)> = vec![
        (route::RetryPolicy { retry_on: "5xx,sometimes".into(), ..Default::default() }, "retry_on", "unknown retry condition \"sometimes\""),
        (route::RetryPolicy { retry_on: "retriable-headers".into(), ..Default::default() }, "retry_on", "retriable-headers"),
        (
            route::RetryPolicy { retry_on: "5xx".into(), retriable_headers: vec![Default::default()], ..Default::default() },
            "retriable_headers",
            "not supported",
        ),
        (
            route::RetryPolicy { retry_on: "5xx".into(), retry_priority: Some(Default::default()), ..Default::default() },
            "retry_priority",
            "not supported",
        ),
        (
            route::RetryPolicy { retry_on: "5xx".into(), rate_limited_retry_back_off: Some(Default::default()), ..Default::default() },
            "rate_limited_retry_back_off",
            "not supported",
        ),
        (
            route::RetryPolicy { retry_on: "5xx".into(), per_try_idle_timeout: Some(proto_duration(5)), ..Default::default() },
            "per_try_idle_timeout",
            "not supported",
        ),
        (
            route::RetryPolicy {
                retry_on: "5xx".into(),
                retry_host_predicate: vec![route::retry_policy::RetryHostPredicate {
                    name: "envoy.retry_host_predicates.omit_canary_hosts".into(),
                    config_type: None,
                }],
                ..Default::default()
            },
            "retry_host_predicate[0]",
            "only envoy.retry_host_predicates.previous_hosts",
        ),
        (
            route::RetryPolicy {
                retry_on: "5xx".into(),
                retry_back_off: Some(route::retry_policy::RetryBackOff {
                    base_interval: Some(proto_duration(100)),
                    max_interval: Some(proto_duration(50)),
                }),
                ..Default::default()
            },
            "retry_back_off.max_interval",
            "greater than or equal",
        ),
        (
            route::RetryPolicy {
                retry_on: "5xx".into(),
                retry_back_off: Some(route::retry_policy::RetryBackOff { base_interval: None, max_interval: None }),
                ..Default::default()
            },
            "retry_back_off.base_interval",
            "is required",
        ),
    ];
    for (policy, field, reason) in cases {
        assert_refused(
            decode_routes(&route_config(vec![vhost("v", &["*"], vec![retrying_route(policy)])])),
            "RouteConfiguration \"table\"",
            &format!("virtual_hosts[0].routes[0].route.retry_policy.{field}"),
            reason,
        );
    }
    // The same checks apply to a virtual host's policy, and the attempt header for timeouts is refused.
    let mut v = vhost("v", &["*"], vec![prefix_route("/", "c")]);
    v.retry_policy = Some(route::RetryPolicy { retry_on: "5xx,nope".into(), ..Default::default() });
    assert_refused(decode_routes(&route_config(vec![v])), "RouteConfiguration \"table\"", "virtual_hosts[0].retry_policy.retry_on", "nope");
    let mut v = vhost("v", &["*"], vec![prefix_route("/", "c")]);
    v.include_is_timeout_retry_header = true;
    assert_refused(decode_routes(&route_config(vec![v])), "RouteConfiguration \"table\"", "virtual_hosts[0].include_is_timeout_retry_header", "not supported");
    let mut r = prefix_route("/", "c");
    if let Some(route::route::Action::Route(action)) = &mut r.action {
        action.priority = 1;
    }
    assert_refused(decode_routes(&route_config(vec![vhost("v", &["*"], vec![r])])), "RouteConfiguration \"table\"", "virtual_hosts[0].routes[0].route.priority", "not supported");
}

fn cluster_with_breakers(thresholds: Vec<cluster::circuit_breakers::Thresholds>) -> cluster::Cluster {
    let mut c = static_cluster("web", 8080);
    c.circuit_breakers = Some(cluster::CircuitBreakers { thresholds, ..Default::default() });
    c
}

#[test]
fn circuit_breakers_land_in_the_model_and_default_as_envoys() {
    use meshctl_engine::model::circuit_breaker::{CircuitBreakers, RetryLimit};
    let decoded = xds::decode_cluster(&static_cluster("web", 8080).encode_to_vec(), &Default::default()).unwrap();
    assert_eq!(decoded.circuit_breakers, CircuitBreakers::default());
    assert_eq!(decoded.circuit_breakers.max_connections, 1024);
    assert_eq!(decoded.circuit_breakers.retries, RetryLimit::Fixed { max_retries: 3 });

    let c = cluster_with_breakers(vec![cluster::circuit_breakers::Thresholds {
        max_connections: Some(UInt32Value { value: 1 }),
        max_pending_requests: Some(UInt32Value { value: 2 }),
        max_requests: Some(UInt32Value { value: 3 }),
        max_retries: Some(UInt32Value { value: 4 }),
        track_remaining: true,
        ..Default::default()
    }]);
    let decoded = xds::decode_cluster(&c.encode_to_vec(), &Default::default()).unwrap().circuit_breakers;
    assert_eq!(
        decoded,
        CircuitBreakers { max_connections: 1, max_pending_requests: 2, max_requests: 3, retries: RetryLimit::Fixed { max_retries: 4 } }
    );

    // A retry budget replaces max_retries; its defaults are 20 % and 3.
    let c = cluster_with_breakers(vec![cluster::circuit_breakers::Thresholds {
        max_retries: Some(UInt32Value { value: 4 }),
        retry_budget: Some(Default::default()),
        ..Default::default()
    }]);
    let decoded = xds::decode_cluster(&c.encode_to_vec(), &Default::default()).unwrap().circuit_breakers;
    assert_eq!(decoded.retries, RetryLimit::Budget { budget_percent: 20.0, min_retry_concurrency: 3 });
    assert_eq!(decoded.retries.max(100), 20);
    assert_eq!(decoded.retries.max(5), 3);
    assert_eq!(decoded.max_requests, 1024);
}

#[test]
fn unsupported_circuit_breaker_settings_are_refused_with_their_path() {
    let high = cluster_with_breakers(vec![cluster::circuit_breakers::Thresholds {
        priority: core::RoutingPriority::High as i32,
        ..Default::default()
    }]);
    assert_refused(xds::decode_cluster(&high.encode_to_vec(), &Default::default()), "Cluster \"web\"", "circuit_breakers.thresholds[0].priority", "only DEFAULT");
    let pools = cluster_with_breakers(vec![cluster::circuit_breakers::Thresholds {
        max_connection_pools: Some(UInt32Value { value: 1 }),
        ..Default::default()
    }]);
    assert_refused(
        xds::decode_cluster(&pools.encode_to_vec(), &Default::default()),
        "Cluster \"web\"",
        "circuit_breakers.thresholds[0].max_connection_pools",
        "not supported",
    );
    let mut per_host = static_cluster("web", 8080);
    per_host.circuit_breakers = Some(cluster::CircuitBreakers { per_host_thresholds: vec![Default::default()], ..Default::default() });
    assert_refused(
        xds::decode_cluster(&per_host.encode_to_vec(), &Default::default()),
        "Cluster \"web\"",
        "circuit_breakers.per_host_thresholds",
        "not supported",
    );
    let interval = cluster_with_breakers(vec![cluster::circuit_breakers::Thresholds {
        retry_budget: Some(cluster::circuit_breakers::thresholds::RetryBudget {
            budget_interval: Some(proto_duration(100)),
            ..Default::default()
        }),
        ..Default::default()
    }]);
    assert_refused(
        xds::decode_cluster(&interval.encode_to_vec(), &Default::default()),
        "Cluster \"web\"",
        "circuit_breakers.thresholds[0].retry_budget.budget_interval",
        "not supported",
    );
}

fn outlier_cluster(detection: cluster::OutlierDetection) -> cluster::Cluster {
    let mut c = static_cluster("web", 8080);
    c.outlier_detection = Some(detection);
    c
}

fn pb_duration(seconds: i64, nanos: i32) -> Option<envoy_types::pb::google::protobuf::Duration> {
    Some(envoy_types::pb::google::protobuf::Duration { seconds, nanos })
}

fn decode(c: &cluster::Cluster) -> Result<meshctl_engine::model::ClusterConfig, xds::ConfigError> {
    xds::decode_cluster(&c.encode_to_vec(), &Default::default())
}

#[test]
fn outlier_detection_defaults_are_envoys() {
    let config = decode(&outlier_cluster(Default::default())).unwrap();
    let o = config.outlier_detection.expect("outlier detection decoded");
    assert_eq!((o.consecutive_5xx, o.consecutive_gateway_failure, o.consecutive_local_origin_failure), (5, 5, 5));
    assert_eq!((o.interval, o.base_ejection_time, o.max_ejection_time), (Duration::from_secs(10), Duration::from_secs(30), Duration::from_secs(300)));
    assert_eq!(o.max_ejection_percent, 10);
    assert_eq!((o.enforcing_consecutive_5xx, o.enforcing_consecutive_gateway_failure, o.enforcing_consecutive_local_origin_failure), (100, 0, 100));
    assert_eq!((o.enforcing_success_rate, o.success_rate_minimum_hosts, o.success_rate_request_volume, o.success_rate_stdev_factor), (100, 5, 100, 1900));
    assert_eq!((o.failure_percentage_threshold, o.enforcing_failure_percentage, o.failure_percentage_request_volume), (85, 0, 50));
    assert!(!o.split_external_local_origin_errors && !o.always_eject_one_host);
    assert_eq!(config.healthy_panic_threshold, 50);
    assert_eq!(config.update_merge_window, Duration::from_secs(1));
    assert!(decode(&static_cluster("web", 8080)).unwrap().outlier_detection.is_none());
}

#[test]
fn outlier_detection_fields_land_in_the_model() {
    let u = |value| Some(UInt32Value { value });
    let mut c = outlier_cluster(cluster::OutlierDetection {
        consecutive_5xx: u(3),
        consecutive_gateway_failure: u(2),
        enforcing_consecutive_gateway_failure: u(100),
        split_external_local_origin_errors: true,
        consecutive_local_origin_failure: u(4),
        interval: pb_duration(1, 0),
        base_ejection_time: pb_duration(5, 0),
        max_ejection_percent: u(50),
        max_ejection_time_jitter: pb_duration(0, 250_000_000),
        always_eject_one_host: Some(BoolValue { value: true }),
        ..Default::default()
    });
    c.common_lb_config = Some(cluster::cluster::CommonLbConfig {
        healthy_panic_threshold: Some(envoy_types::pb::envoy::r#type::v3::Percent { value: 30.4 }),
        ..Default::default()
    });
    let config = decode(&c).unwrap();
    let o = config.outlier_detection.unwrap();
    assert_eq!((o.consecutive_5xx, o.consecutive_gateway_failure, o.enforcing_consecutive_gateway_failure), (3, 2, 100));
    assert!(o.split_external_local_origin_errors && o.always_eject_one_host);
    assert_eq!(o.consecutive_local_origin_failure, 4);
    assert_eq!((o.interval, o.base_ejection_time), (Duration::from_secs(1), Duration::from_secs(5)));
    assert_eq!(o.max_ejection_time, Duration::from_secs(300), "unset: 300 s or the base, the longer");
    assert_eq!(o.max_ejection_time_jitter, Duration::from_millis(250));
    assert_eq!(o.max_ejection_percent, 50);
    assert_eq!(config.healthy_panic_threshold, 30, "rounded to a whole percent, as Envoy");
    // A base ejection time above 300 s raises the default cap with it.
    let long = decode(&outlier_cluster(cluster::OutlierDetection { base_ejection_time: pb_duration(400, 0), ..Default::default() }));
    assert_eq!(long.unwrap().outlier_detection.unwrap().max_ejection_time, Duration::from_secs(400));
}

#[test]
fn istios_outlier_detection_and_panic_threshold_zero_are_accepted() {
    // What istiod emits for a DestinationRule with consecutive5xxErrors, consecutiveGatewayErrors,
    // splitExternalLocalOriginErrors and no minHealthPercent.
    let u = |value| Some(UInt32Value { value });
    let mut c = outlier_cluster(cluster::OutlierDetection {
        enforcing_success_rate: u(0),
        consecutive_5xx: u(7),
        enforcing_consecutive_5xx: u(100),
        consecutive_gateway_failure: u(0),
        enforcing_consecutive_gateway_failure: u(0),
        interval: pb_duration(10, 0),
        base_ejection_time: pb_duration(30, 0),
        max_ejection_percent: u(100),
        split_external_local_origin_errors: true,
        consecutive_local_origin_failure: u(3),
        enforcing_consecutive_local_origin_failure: u(100),
        enforcing_local_origin_success_rate: u(0),
        ..Default::default()
    });
    c.common_lb_config = Some(cluster::cluster::CommonLbConfig {
        healthy_panic_threshold: Some(envoy_types::pb::envoy::r#type::v3::Percent { value: 0.0 }),
        ..Default::default()
    });
    let config = decode(&c).unwrap();
    assert_eq!(config.healthy_panic_threshold, 0);
    let o = config.outlier_detection.unwrap();
    assert_eq!((o.enforcing_success_rate, o.enforcing_local_origin_success_rate, o.consecutive_gateway_failure), (0, 0, 0));
    // An HTTP protocol options' outlier_detection without an error matcher is Envoy's default.
    let mut options = envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions {
        outlier_detection: Some(Default::default()),
        ..Default::default()
    };
    let typed = |options: &envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions| {
        let mut with_options = static_cluster("web", 8080);
        with_options.typed_extension_protocol_options.insert(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".into(),
            envoy_types::pb::google::protobuf::Any {
                type_url: "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions".into(),
                value: options.encode_to_vec(),
            },
        );
        decode(&with_options)
    };
    typed(&options).unwrap();
    options.outlier_detection.as_mut().unwrap().error_matcher = Some(Default::default());
    assert_refused(
        typed(&options),
        "Cluster \"web\"",
        "typed_extension_protocol_options[\"envoy.extensions.upstreams.http.v3.HttpProtocolOptions\"].outlier_detection.error_matcher",
        "not supported",
    );
}

#[test]
fn outlier_detection_and_common_lb_config_refusals_name_the_field() {
    let u = |value| Some(UInt32Value { value });
    let cases: Vec<(cluster::OutlierDetection, &str, &str)> = vec![
        (cluster::OutlierDetection { max_ejection_percent: u(101), ..Default::default() }, "outlier_detection.max_ejection_percent", "not a percentage"),
        (cluster::OutlierDetection { enforcing_consecutive_5xx: u(200), ..Default::default() }, "outlier_detection.enforcing_consecutive_5xx", "not a percentage"),
        (cluster::OutlierDetection { interval: pb_duration(0, 0), ..Default::default() }, "outlier_detection.interval", "at least 1ms"),
        (
            cluster::OutlierDetection { base_ejection_time: pb_duration(60, 0), max_ejection_time: pb_duration(30, 0), ..Default::default() },
            "outlier_detection.max_ejection_time",
            "smaller than base_ejection_time",
        ),
        (cluster::OutlierDetection { monitors: vec![Default::default()], ..Default::default() }, "outlier_detection.monitors", "not supported"),
        (
            cluster::OutlierDetection { detect_degraded_hosts: Some(BoolValue { value: true }), ..Default::default() },
            "outlier_detection.detect_degraded_hosts",
            "not supported",
        ),
    ];
    for (detection, field, reason) in cases {
        assert_refused(decode(&outlier_cluster(detection)), "Cluster \"web\"", field, reason);
    }
    // ORIGINAL_DST: one endpoint per destination, nothing to eject from.
    let mut original = cluster::Cluster { name: "web".into(), ..Default::default() };
    original.cluster_discovery_type = Some(cluster::cluster::ClusterDiscoveryType::Type(cluster::cluster::DiscoveryType::OriginalDst as i32));
    original.lb_policy = cluster::cluster::LbPolicy::ClusterProvided as i32;
    decode(&original).unwrap();
    original.outlier_detection = Some(Default::default());
    assert_refused(decode(&original), "Cluster \"web\"", "outlier_detection", "not supported");

    let with_common = |common: cluster::cluster::CommonLbConfig| {
        let mut c = static_cluster("web", 8080);
        c.common_lb_config = Some(common);
        decode(&c)
    };
    assert_refused(
        with_common(cluster::cluster::CommonLbConfig {
            healthy_panic_threshold: Some(envoy_types::pb::envoy::r#type::v3::Percent { value: 150.0 }),
            ..Default::default()
        }),
        "Cluster \"web\"",
        "common_lb_config.healthy_panic_threshold.value",
        "not a percentage",
    );
    assert_refused(
        with_common(cluster::cluster::CommonLbConfig {
            locality_config_specifier: Some(cluster::cluster::common_lb_config::LocalityConfigSpecifier::LocalityWeightedLbConfig(
                Default::default(),
            )),
            ..Default::default()
        }),
        "Cluster \"web\"",
        "common_lb_config.locality_config_specifier",
        "not supported",
    );
    assert_refused(
        with_common(cluster::cluster::CommonLbConfig { close_connections_on_host_set_change: true, ..Default::default() }),
        "Cluster \"web\"",
        "common_lb_config.close_connections_on_host_set_change",
        "not supported",
    );
    // The merge window delays when the balancer learns of health changes.
    let merged = with_common(cluster::cluster::CommonLbConfig { update_merge_window: pb_duration(0, 0), ..Default::default() });
    assert_eq!(merged.unwrap().update_merge_window, Duration::ZERO);
}
