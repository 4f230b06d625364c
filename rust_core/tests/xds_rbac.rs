//! RBAC filters and path settings of the HTTP connection manager: decoded into the policy model
//! and evaluated, or refused with the exact field path of what meshctl does not implement.

// Deprecated RBAC fields (metadata, source_ip) are still Envoy's, so their refusal is tested too.
#![allow(deprecated)]

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::listener::v3 as listener;
use envoy_types::pb::envoy::config::rbac::v3 as rbac;
use envoy_types::pb::envoy::config::route::v3 as route;
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3 as rbac_filter;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use envoy_types::pb::google::protobuf::{Any, BoolValue, UInt32Value};
use http::{HeaderMap, HeaderValue, Method};
use meshctl_engine::http::routing::RequestView;
use meshctl_engine::model::secret::SecretRegistry;
use meshctl_engine::model::{HttpSettings, ListenerConfig, NetworkHandler};
use meshctl_engine::policy::evaluate::RequestFacts;
use meshctl_engine::policy::model::RbacAction;
use meshctl_engine::policy::path::EscapedSlashes;
use meshctl_engine::telemetry::metrics::Metrics;
use meshctl_engine::xds::{self, ConfigError};
use prost::Message;

const RBAC_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";
const HCM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const ROUTER_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";
/// Where the first HTTP filter's config sits inside the listener.
const FILTER_0: &str = "filter_chains[0].filters[0].typed_config.http_filters[0].typed_config";

fn any<M: Message>(type_url: &str, message: &M) -> Any {
    Any { type_url: type_url.into(), value: message.encode_to_vec() }
}

fn prefix(s: &str) -> matcher::StringMatcher {
    matcher::StringMatcher { match_pattern: Some(matcher::string_matcher::MatchPattern::Prefix(s.into())), ignore_case: false }
}

fn exact(s: &str) -> matcher::StringMatcher {
    matcher::StringMatcher { match_pattern: Some(matcher::string_matcher::MatchPattern::Exact(s.into())), ignore_case: false }
}

fn permission(rule: rbac::permission::Rule) -> rbac::Permission {
    rbac::Permission { rule: Some(rule) }
}

fn principal(identifier: rbac::principal::Identifier) -> rbac::Principal {
    rbac::Principal { identifier: Some(identifier) }
}

fn url_path(m: matcher::StringMatcher) -> rbac::Permission {
    permission(rbac::permission::Rule::UrlPath(matcher::PathMatcher { rule: Some(matcher::path_matcher::Rule::Path(m)) }))
}

fn header(name: &str, m: matcher::StringMatcher) -> route::HeaderMatcher {
    route::HeaderMatcher {
        name: name.into(),
        header_match_specifier: Some(route::header_matcher::HeaderMatchSpecifier::StringMatch(m)),
        ..Default::default()
    }
}

fn any_principal() -> rbac::Principal {
    principal(rbac::principal::Identifier::Any(true))
}

fn policy(permissions: Vec<rbac::Permission>, principals: Vec<rbac::Principal>) -> rbac::Policy {
    rbac::Policy { permissions, principals, ..Default::default() }
}

fn rules(action: rbac::rbac::Action, policies: Vec<(&str, rbac::Policy)>) -> rbac_filter::Rbac {
    rbac_filter::Rbac {
        rules: Some(rbac::Rbac {
            action: action as i32,
            policies: policies.into_iter().map(|(name, p)| (name.to_string(), p)).collect(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn rbac_http_filter(config: &rbac_filter::Rbac) -> hcm::HttpFilter {
    hcm::HttpFilter {
        name: "envoy.filters.http.rbac".into(),
        config_type: Some(hcm::http_filter::ConfigType::TypedConfig(any(RBAC_TYPE, config))),
        ..Default::default()
    }
}

/// The inbound mesh HCM: normalization on, the given HTTP filters, then the router.
fn mesh_manager(filters: Vec<hcm::HttpFilter>) -> hcm::HttpConnectionManager {
    use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
    let router = hcm::HttpFilter {
        name: "envoy.filters.http.router".into(),
        config_type: Some(hcm::http_filter::ConfigType::TypedConfig(any(ROUTER_TYPE, &Router::default()))),
        ..Default::default()
    };
    hcm::HttpConnectionManager {
        stat_prefix: "inbound".into(),
        normalize_path: Some(BoolValue { value: true }),
        merge_slashes: true,
        path_with_escaped_slashes_action: hcm::http_connection_manager::PathWithEscapedSlashesAction::RejectRequest as i32,
        http_filters: filters.into_iter().chain([router]).collect(),
        route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::RouteConfig(route::RouteConfiguration {
            name: "local".into(),
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn decode(manager: &hcm::HttpConnectionManager, metrics: &Metrics) -> Result<ListenerConfig, ConfigError> {
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
                config_type: Some(listener::filter::ConfigType::TypedConfig(any(HCM_TYPE, manager))),
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    xds::decode_listener(&l.encode_to_vec(), metrics, &SecretRegistry::default())
}

fn settings(config: &ListenerConfig) -> &HttpSettings {
    match &config.filter_chains[0].handler {
        NetworkHandler::Http(settings) => settings,
        other => panic!("not an HTTP chain: {other:?}"),
    }
}

fn refused(manager: &hcm::HttpConnectionManager) -> ConfigError {
    decode(manager, &Metrics::default()).expect_err("should be refused")
}

#[test]
fn istio_shaped_filters_decode_and_decide() {
    use rbac::permission::Rule;
    use rbac::principal::Identifier;
    let deny = rules(rbac::rbac::Action::Deny, vec![("ns[default]-policy[deny-admin]-rule[0]", policy(vec![url_path(prefix("/admin"))], vec![any_principal()]))]);
    let allow = rules(
        rbac::rbac::Action::Allow,
        vec![
            (
                "ns[default]-policy[viewers]-rule[0]",
                policy(
                    vec![permission(Rule::AndRules(rbac::permission::Set {
                        rules: vec![
                            permission(Rule::Header(header(":method", exact("GET")))),
                            permission(Rule::DestinationPort(9080)),
                        ],
                    }))],
                    vec![principal(Identifier::Authenticated(rbac::principal::Authenticated {
                        principal_name: Some(matcher::StringMatcher {
                            match_pattern: Some(matcher::string_matcher::MatchPattern::SafeRegex(matcher::RegexMatcher {
                                regex: "spiffe://[^/]+/ns/front/sa/[^/]+".into(),
                                ..Default::default()
                            })),
                            ignore_case: false,
                        }),
                    }))],
                ),
            ),
            (
                "ns[default]-policy[by-header]-rule[0]",
                policy(vec![permission(Rule::Any(true))], vec![principal(Identifier::Header(header("x-caller", exact("trusted"))))]),
            ),
        ],
    );
    let metrics = Metrics::default();
    let config = decode(&mesh_manager(vec![rbac_http_filter(&deny), rbac_http_filter(&allow)]), &metrics).unwrap();
    let settings = settings(&config);
    assert!(settings.path_normalization.normalize && settings.path_normalization.merge_slashes);
    assert_eq!(settings.path_normalization.escaped_slashes, EscapedSlashes::RejectRequest);
    let actions: Vec<_> = settings.rbac.filters.iter().map(|f| f.action).collect();
    assert_eq!(actions, [RbacAction::Deny, RbacAction::Allow]);
    // Policies in name order, as Envoy's map keeps them.
    let names: Vec<_> = settings.rbac.filters[1].policies.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["ns[default]-policy[by-header]-rule[0]", "ns[default]-policy[viewers]-rule[0]"]);

    let decide = |method: Method, path: &str, port: u16, principal: Option<&str>, caller: Option<&'static str>| {
        let mut headers = HeaderMap::new();
        if let Some(caller) = caller {
            headers.insert("x-caller", HeaderValue::from_static(caller));
        }
        let view = RequestView { method: &method, path_and_query: path, authority: "svc", scheme: "http", headers: &headers };
        settings.rbac.check(&RequestFacts { request: &view, destination_port: port, principal }).map_err(|d| (d.action, d.policy.to_string()))
    };
    let front = Some("spiffe://cluster.local/ns/front/sa/web");
    assert_eq!(decide(Method::GET, "/data", 9080, front, None), Ok(()));
    assert_eq!(decide(Method::GET, "/admin/x", 9080, front, None), Err((RbacAction::Deny, "ns[default]-policy[deny-admin]-rule[0]".into())));
    assert_eq!(decide(Method::POST, "/data", 9080, front, None), Err((RbacAction::Allow, String::new())));
    assert_eq!(decide(Method::GET, "/data", 7000, front, None), Err((RbacAction::Allow, String::new())));
    assert_eq!(decide(Method::GET, "/data", 9080, Some("spiffe://cluster.local/ns/back/sa/web"), None), Err((RbacAction::Allow, String::new())));
    assert_eq!(decide(Method::GET, "/data", 9080, None, None), Err((RbacAction::Allow, String::new())));
    assert_eq!(decide(Method::POST, "/data", 1, None, Some("trusted")), Ok(()));

    let text = metrics.render_prometheus();
    assert!(text.contains("meshctl_rbac_denied_total{action=\"DENY\",policy=\"ns[default]-policy[deny-admin]-rule[0]\"} 1"), "{text}");
    assert!(text.contains("meshctl_rbac_denied_total{action=\"ALLOW\",policy=\"\"} 4"), "{text}");
    assert!(text.contains("meshctl_rbac_allowed_total 2"), "{text}");
}

#[test]
fn no_rules_enforce_nothing_and_defaults_leave_paths_alone() {
    let empty = rbac_filter::Rbac::default();
    let mut manager = mesh_manager(vec![rbac_http_filter(&empty)]);
    manager.normalize_path = None;
    manager.merge_slashes = false;
    manager.path_with_escaped_slashes_action = 0;
    let config = decode(&manager, &Metrics::default()).unwrap();
    let settings = settings(&config);
    assert!(settings.rbac.filters.is_empty());
    assert!(!settings.path_normalization.is_enabled());
}

#[test]
fn unsupported_fields_are_refused_with_their_path() {
    use rbac::permission::Rule;
    use rbac::principal::Identifier;
    let cidr = || core::CidrRange { address_prefix: "10.0.0.0".into(), prefix_len: Some(UInt32Value { value: 8 }) };
    let deny = |p: rbac::Policy| rules(rbac::rbac::Action::Deny, vec![("p", p)]);
    let with_permission = |x: rbac::Permission| deny(policy(vec![x], vec![any_principal()]));
    let with_principal = |x: rbac::Principal| deny(policy(vec![permission(Rule::Any(true))], vec![x]));

    let mut cases: Vec<(rbac_filter::Rbac, String)> = vec![
        (rbac_filter::Rbac { shadow_rules: Some(rbac::Rbac::default()), ..Default::default() }, "shadow_rules".into()),
        (
            rbac_filter::Rbac { matcher: Some(Default::default()), ..Default::default() },
            "matcher".into(),
        ),
        (rules(rbac::rbac::Action::Log, vec![]), "rules.action".into()),
        (
            rbac_filter::Rbac {
                rules: Some(rbac::Rbac { audit_logging_options: Some(Default::default()), ..Default::default() }),
                ..Default::default()
            },
            "rules.audit_logging_options".into(),
        ),
        (deny(rbac::Policy { condition: Some(Default::default()), ..policy(vec![permission(Rule::Any(true))], vec![any_principal()]) }), "condition".into()),
        (deny(policy(vec![], vec![any_principal()])), "permissions".into()),
        (deny(policy(vec![permission(Rule::Any(true))], vec![])), "principals".into()),
        (with_permission(permission(Rule::RequestedServerName(exact("a")))), "permissions[0].requested_server_name".into()),
        (with_permission(permission(Rule::DestinationIp(cidr()))), "permissions[0].destination_ip".into()),
        (with_permission(permission(Rule::DestinationPortRange(Default::default()))), "permissions[0].destination_port_range".into()),
        (with_permission(permission(Rule::DestinationPort(70000))), "permissions[0].destination_port".into()),
        (with_permission(permission(Rule::Any(false))), "permissions[0].any".into()),
        (
            with_permission(permission(Rule::AndRules(rbac::permission::Set {
                rules: vec![permission(Rule::Any(true)), permission(Rule::Metadata(Default::default()))],
            }))),
            "permissions[0].and_rules.rules[1].metadata".into(),
        ),
        (with_permission(permission(Rule::NotRule(Box::new(permission(Rule::Matcher(Default::default())))))), "permissions[0].not_rule.matcher".into()),
        (
            with_permission(url_path(matcher::StringMatcher {
                match_pattern: Some(matcher::string_matcher::MatchPattern::SafeRegex(matcher::RegexMatcher { regex: "(".into(), ..Default::default() })),
                ignore_case: false,
            })),
            "permissions[0].url_path.path.safe_regex.regex".into(),
        ),
        (with_principal(principal(Identifier::RemoteIp(cidr()))), "principals[0].remote_ip".into()),
        (with_principal(principal(Identifier::SourceIp(cidr()))), "principals[0].source_ip".into()),
        (with_principal(principal(Identifier::DirectRemoteIp(cidr()))), "principals[0].direct_remote_ip".into()),
        (with_principal(principal(Identifier::Metadata(Default::default()))), "principals[0].metadata".into()),
        (
            with_principal(principal(Identifier::OrIds(rbac::principal::Set {
                ids: vec![principal(Identifier::NotId(Box::new(principal(Identifier::FilterState(Default::default())))))],
            }))),
            "principals[0].or_ids.ids[0].not_id.filter_state".into(),
        ),
        (with_principal(principal(Identifier::AndIds(rbac::principal::Set { ids: vec![] }))), "principals[0].and_ids.ids".into()),
        (
            with_principal(principal(Identifier::Authenticated(rbac::principal::Authenticated {
                principal_name: Some(matcher::StringMatcher {
                    match_pattern: Some(matcher::string_matcher::MatchPattern::SafeRegex(matcher::RegexMatcher { regex: "x".into(), ..Default::default() })),
                    ignore_case: true,
                }),
            }))),
            "principals[0].authenticated.principal_name.ignore_case".into(),
        ),
    ];
    // Paths under a policy are relative to the policy; prefix them.
    for (_, field) in cases.iter_mut() {
        if field.starts_with("permissions") || field.starts_with("principals") || field == "condition" {
            *field = format!("rules.policies[\"p\"].{field}");
        }
    }
    for (config, field) in cases {
        let error = refused(&mesh_manager(vec![rbac_http_filter(&config)]));
        assert_eq!(error.field, format!("{FILTER_0}.{field}"), "{error}");
        assert_eq!(error.resource, "Listener \"inbound\"");
    }
}

#[test]
fn connection_manager_path_settings_that_are_refused() {
    use hcm::http_connection_manager::PathWithEscapedSlashesAction as Action;
    let mut manager = mesh_manager(vec![]);
    manager.path_with_escaped_slashes_action = Action::UnescapeAndRedirect as i32;
    let error = refused(&manager);
    assert_eq!(error.field, "filter_chains[0].filters[0].typed_config.path_with_escaped_slashes_action");
    assert!(error.reason.contains("UNESCAPE_AND_REDIRECT"), "{error}");

    let mut manager = mesh_manager(vec![]);
    manager.path_normalization_options = Some(Default::default());
    assert_eq!(refused(&manager).field, "filter_chains[0].filters[0].typed_config.path_normalization_options");

    let mut disabled = rbac_http_filter(&rules(rbac::rbac::Action::Allow, vec![]));
    disabled.disabled = true;
    assert_eq!(refused(&mesh_manager(vec![disabled])).field, "filter_chains[0].filters[0].typed_config.http_filters[0].disabled");

    let untyped = hcm::HttpFilter { name: "envoy.filters.http.rbac".into(), ..Default::default() };
    assert_eq!(refused(&mesh_manager(vec![untyped])).field, FILTER_0);

    // Accepted: UNESCAPE_AND_FORWARD.
    let mut manager = mesh_manager(vec![]);
    manager.path_with_escaped_slashes_action = Action::UnescapeAndForward as i32;
    let config = decode(&manager, &Metrics::default()).unwrap();
    assert_eq!(settings(&config).path_normalization.escaped_slashes, EscapedSlashes::UnescapeAndForward);
}
