//! RouteConfiguration → model::RouteConfig.

use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::route::v3 as route;
use http::StatusCode;
use prost::Message;

use super::fault::{http_fault, mirror_policy, FAULT_FILTER_TYPE};
use super::local_ratelimit::{local_rate_limit, rate_limits, LOCAL_RATELIMIT_TYPE};
use crate::model::local_ratelimit::LocalRateLimit;
use super::common::{data_source, duration, header_mutation, regex_matcher, string_matcher};
use super::retry::retry_policy;
use super::{refuse_if, At, ConfigError, FieldError, FieldResult};
use crate::model::retry::{RetryPolicy, DEFAULT_RETRY_BUFFER_LIMIT};
use crate::model::route::*;
use crate::telemetry::metrics::Metrics;

/// Envoy's default per-route timeout.
const DEFAULT_ROUTE_TIMEOUT: Duration = Duration::from_secs(15);

pub fn decode_route_configuration(bytes: &[u8], metrics: &Metrics) -> Result<RouteConfig, ConfigError> {
    let message = route::RouteConfiguration::decode(bytes)
        .map_err(|e| ConfigError::new("RouteConfiguration", "", format!("not a valid protobuf: {e}")))?;
    route_configuration(&message, metrics)
        .map_err(|e| e.into_config_error(format!("RouteConfiguration {:?}", message.name)))
}

pub(crate) fn route_configuration(rc: &route::RouteConfiguration, metrics: &Metrics) -> FieldResult<RouteConfig> {
    refuse_if(rc.vhds.is_some(), "vhds")?;
    refuse_if(!rc.internal_only_headers.is_empty(), "internal_only_headers")?;
    refuse_if(!rc.cluster_specifier_plugins.is_empty(), "cluster_specifier_plugins")?;
    refuse_if(!rc.request_mirror_policies.is_empty(), "request_mirror_policies")?;
    refuse_if(!rc.vhost_header.is_empty(), "vhost_header")?;
    refuse_if(rc.most_specific_header_mutations_wins, "most_specific_header_mutations_wins")?;
    let rc_rate_limit = rate_limit_only(&rc.typed_per_filter_config, metrics)?;
    let mut virtual_hosts = Vec::with_capacity(rc.virtual_hosts.len());
    let mut domains = DomainIndex::default();
    for (i, vh) in rc.virtual_hosts.iter().enumerate() {
        let vhost = virtual_host(&rc.name, vh, &rc_rate_limit, metrics).at(format!("virtual_hosts[{i}]"))?;
        for (j, domain) in vhost.domains.iter().enumerate() {
            index_domain(&mut domains, domain, i).at(format!("virtual_hosts[{i}].domains[{j}]"))?;
        }
        virtual_hosts.push(vhost);
    }
    domains.suffixes.sort_by(|a, b| b.0.len().cmp(&a.0.len()));
    domains.prefixes.sort_by(|a, b| b.0.len().cmp(&a.0.len()));
    Ok(RouteConfig {
        name: rc.name.clone(),
        virtual_hosts,
        ignore_port_in_host_matching: rc.ignore_port_in_host_matching,
        request_headers: header_mutation(&rc.request_headers_to_add, &rc.request_headers_to_remove)
            .at("request_headers_to_add")?,
        response_headers: header_mutation(&rc.response_headers_to_add, &rc.response_headers_to_remove)
            .at("response_headers_to_add")?,
        domains,
    })
}

fn index_domain(index: &mut DomainIndex, domain: &str, vhost: usize) -> FieldResult<()> {
    let duplicate = || Err(FieldError::new("", format!("domain {domain:?} is listed by two virtual hosts")));
    if domain == "*" {
        if index.wildcard.replace(vhost).is_some() {
            return duplicate();
        }
    } else if let Some(suffix) = domain.strip_prefix('*') {
        if index.suffixes.iter().any(|(s, _)| s == suffix) {
            return duplicate();
        }
        index.suffixes.push((suffix.to_string(), vhost));
    } else if let Some(prefix) = domain.strip_suffix('*') {
        if index.prefixes.iter().any(|(p, _)| p == prefix) {
            return duplicate();
        }
        index.prefixes.push((prefix.to_string(), vhost));
    } else if domain.contains('*') {
        return Err(FieldError::new("", format!("{domain:?}: a wildcard may only start or end a domain")));
    } else if index.exact.insert(domain.to_string(), vhost).is_some() {
        return duplicate();
    }
    Ok(())
}

/// Per-filter local rate limit configs by filter instance name, as a route finds them.
type NamedRateLimits = Vec<(String, Arc<LocalRateLimit>)>;

/// The typed_per_filter_config of a route config or virtual host: only the local rate limit
/// filter's is supported there (the fault filter's only on routes). Each is kept under its key,
/// the name of the filter instance it configures; a key naming no filter of the connection
/// manager is never looked up, as in Envoy.
fn rate_limit_only(
    configs: &std::collections::HashMap<String, envoy_types::pb::google::protobuf::Any>,
    metrics: &Metrics,
) -> FieldResult<NamedRateLimits> {
    let mut found = Vec::new();
    for (name, any) in sorted(configs) {
        let at = format!("typed_per_filter_config[{name:?}]");
        if any.type_url != LOCAL_RATELIMIT_TYPE {
            return Err(FieldError::new(
                at,
                format!("per-filter config {} is not supported by meshctl here yet (only {LOCAL_RATELIMIT_TYPE})", any.type_url),
            ));
        }
        found.push((name.clone(), local_rate_limit(any, true, metrics).at(at)?));
    }
    Ok(found)
}

/// A protobuf map's entries in key order, so that the first refusal is the same every time.
fn sorted<V>(map: &std::collections::HashMap<String, V>) -> Vec<(&String, &V)> {
    let mut entries: Vec<_> = map.iter().collect();
    entries.sort_by(|a, b| a.0.cmp(b.0));
    entries
}

/// `specific`'s configs, then `general`'s for the filter names `specific` does not configure.
fn most_specific(mut specific: NamedRateLimits, general: &[(String, Arc<LocalRateLimit>)]) -> NamedRateLimits {
    for (name, config) in general {
        if !specific.iter().any(|(own, _)| own == name) {
            specific.push((name.clone(), config.clone()));
        }
    }
    specific
}

fn virtual_host(
    config_name: &str,
    vh: &route::VirtualHost,
    inherited_rate_limits: &[(String, Arc<LocalRateLimit>)],
    metrics: &Metrics,
) -> FieldResult<VirtualHost> {
    if vh.name.is_empty() {
        return Err(FieldError::new("name", "is required"));
    }
    if vh.domains.is_empty() {
        return Err(FieldError::new("domains", "must list at least one domain"));
    }
    refuse_if(vh.matcher.is_some(), "matcher")?;
    refuse_if(vh.require_tls != 0, "require_tls")?;
    refuse_if(!vh.virtual_clusters.is_empty(), "virtual_clusters")?;
    refuse_if(vh.cors.is_some(), "cors")?;
    let vh_rate_limit = rate_limit_only(&vh.typed_per_filter_config, metrics)?;
    refuse_if(vh.retry_policy_typed_config.is_some(), "retry_policy_typed_config")?;
    refuse_if(vh.hedge_policy.is_some(), "hedge_policy")?;
    refuse_if(vh.include_is_timeout_retry_header, "include_is_timeout_retry_header")?;
    refuse_if(!vh.request_mirror_policies.is_empty(), "request_mirror_policies")?;
    let inherited = VirtualHostDefaults {
        retry_policy: vh.retry_policy.as_ref().map(retry_policy).transpose().at("retry_policy")?.map(Arc::new),
        buffer_limit: buffer_limit(vh.per_request_buffer_limit_bytes.as_ref(), vh.request_body_buffer_limit.as_ref())?,
        local_rate_limits: most_specific(vh_rate_limit, inherited_rate_limits),
    };
    let mut routes = Vec::with_capacity(vh.routes.len());
    for (i, r) in vh.routes.iter().enumerate() {
        let label = if r.name.is_empty() { format!("{}/{}/{}", config_name, vh.name, i) } else { r.name.clone() };
        routes.push(route_entry(r, label, &inherited, metrics).at(format!("routes[{i}]"))?);
    }
    Ok(VirtualHost {
        name: vh.name.clone(),
        domains: vh.domains.iter().map(|d| d.to_ascii_lowercase()).collect(),
        routes,
        request_headers: header_mutation(&vh.request_headers_to_add, &vh.request_headers_to_remove)
            .at("request_headers_to_add")?,
        response_headers: header_mutation(&vh.response_headers_to_add, &vh.response_headers_to_remove)
            .at("response_headers_to_add")?,
        include_request_attempt_count: vh.include_request_attempt_count,
        include_attempt_count_in_response: vh.include_attempt_count_in_response,
        rate_limits: rate_limits(&vh.rate_limits).at("rate_limits")?,
    })
}

/// What a virtual host gives the routes that do not say otherwise.
struct VirtualHostDefaults {
    retry_policy: Option<Arc<RetryPolicy>>,
    buffer_limit: Option<usize>,
    /// The virtual host's local rate limit configs, and its route config's for other filters.
    local_rate_limits: NamedRateLimits,
}

/// The request body buffered for retries (Envoy's per_request_buffer_limit_bytes and its newer
/// request_body_buffer_limit; only one may be set). meshctl buffers only for retries, and does
/// not take the listener's per_connection_buffer_limit_bytes into account.
fn buffer_limit(
    per_request: Option<&envoy_types::pb::google::protobuf::UInt32Value>,
    request_body: Option<&envoy_types::pb::google::protobuf::UInt64Value>,
) -> FieldResult<Option<usize>> {
    match (per_request, request_body) {
        (Some(_), Some(_)) => Err(FieldError::new(
            "request_body_buffer_limit",
            "only one of per_request_buffer_limit_bytes and request_body_buffer_limit may be set",
        )),
        (Some(limit), None) => Ok(Some(limit.value as usize)),
        (None, Some(limit)) => Ok(Some(usize::try_from(limit.value).unwrap_or(usize::MAX))),
        (None, None) => Ok(None),
    }
}

fn route_entry(r: &route::Route, stat_name: String, inherited: &VirtualHostDefaults, metrics: &Metrics) -> FieldResult<Route> {
    let (fault, own_rate_limits) = route_filter_configs(r, metrics)?;
    let mut route_rate_limits = Vec::new();
    let mut include_vh_rate_limits = false;
    let own_buffer_limit = buffer_limit(r.per_request_buffer_limit_bytes.as_ref(), r.request_body_buffer_limit.as_ref())?;
    let matcher = route_match(r.r#match.as_ref().ok_or_else(|| FieldError::new("match", "is required"))?).at("match")?;
    let action = match &r.action {
        Some(route::route::Action::Route(a)) => {
            let mut forward = forward_action(a).at("route")?;
            // The route's own policy wins whole; Envoy does not merge it with the virtual host's.
            forward.retry_policy = forward.retry_policy.or_else(|| inherited.retry_policy.clone());
            forward.retry_buffer_limit = own_buffer_limit.or(inherited.buffer_limit).unwrap_or(DEFAULT_RETRY_BUFFER_LIMIT);
            route_rate_limits = rate_limits(&a.rate_limits).at("route.rate_limits")?;
            include_vh_rate_limits = a.include_vh_rate_limits.as_ref().is_some_and(|b| b.value);
            Action::Forward(forward)
        }
        Some(route::route::Action::Redirect(a)) => Action::Redirect(redirect_action(a).at("redirect")?),
        Some(route::route::Action::DirectResponse(a)) => {
            Action::DirectResponse(direct_response(a).at("direct_response")?)
        }
        Some(route::route::Action::FilterAction(_)) => return Err(FieldError::unsupported("filter_action")),
        Some(route::route::Action::NonForwardingAction(_)) => {
            return Err(FieldError::unsupported("non_forwarding_action"))
        }
        None => return Err(FieldError::new("", "a route needs one of route, redirect, direct_response")),
    };
    Ok(Route {
        name: r.name.clone(),
        matcher,
        action,
        request_headers: header_mutation(&r.request_headers_to_add, &r.request_headers_to_remove)
            .at("request_headers_to_add")?,
        response_headers: header_mutation(&r.response_headers_to_add, &r.response_headers_to_remove)
            .at("response_headers_to_add")?,
        fault,
        local_rate_limits: most_specific(own_rate_limits, &inherited.local_rate_limits),
        rate_limits: route_rate_limits,
        include_vh_rate_limits,
        decorator: decorator(r.decorator.as_ref()).at("decorator")?,
        stats: metrics.route(&stat_name),
    })
}

/// The span name for the route's requests. Envoy's `propagate` (an x-envoy-decorator-operation
/// header to the upstream) is not sent by meshctl; the name is used only for its own spans.
fn decorator(d: Option<&route::Decorator>) -> FieldResult<Option<Arc<str>>> {
    match d {
        None => Ok(None),
        Some(d) if d.operation.is_empty() => Err(FieldError::new("operation", "is required")),
        Some(d) => Ok(Some(Arc::from(d.operation.as_str()))),
    }
}

/// The route's per-filter configs meshctl knows: HTTPFault and LocalRateLimit. A LocalRateLimit
/// is kept under its key, the filter instance's name (Envoy's lookup); the fault filter's is
/// taken whatever its key (meshctl allows one fault filter per connection manager).
type RouteFilterConfigs = (Option<Arc<crate::model::fault::FaultPolicy>>, NamedRateLimits);

fn route_filter_configs(r: &route::Route, metrics: &Metrics) -> FieldResult<RouteFilterConfigs> {
    let (mut fault, mut rate_limits) = (None, Vec::new());
    for (name, any) in sorted(&r.typed_per_filter_config) {
        let at = format!("typed_per_filter_config[{name:?}]");
        if any.type_url == FAULT_FILTER_TYPE {
            if fault.is_some() {
                return Err(FieldError::new(at, "a route may configure the fault filter only once"));
            }
            fault = Some(Arc::new(http_fault(any).at(at)?));
        } else if any.type_url == LOCAL_RATELIMIT_TYPE {
            rate_limits.push((name.clone(), local_rate_limit(any, true, metrics).at(at)?));
        } else {
            return Err(FieldError::new(
                at,
                format!(
                    "per-route config {} is not supported by meshctl yet (only {FAULT_FILTER_TYPE} and {LOCAL_RATELIMIT_TYPE})",
                    any.type_url
                ),
            ));
        }
    }
    Ok((fault, rate_limits))
}

fn route_match(m: &route::RouteMatch) -> FieldResult<RouteMatch> {
    use route::route_match::PathSpecifier;
    refuse_if(m.runtime_fraction.is_some(), "runtime_fraction")?;
    refuse_if(!m.cookies.is_empty(), "cookies")?;
    refuse_if(m.grpc.is_some(), "grpc")?;
    refuse_if(m.tls_context.is_some(), "tls_context")?;
    refuse_if(!m.dynamic_metadata.is_empty(), "dynamic_metadata")?;
    refuse_if(!m.filter_state.is_empty(), "filter_state")?;
    let case_sensitive = m.case_sensitive.as_ref().map(|b| b.value).unwrap_or(true);
    let fold = |s: &String| if case_sensitive { s.clone() } else { s.to_ascii_lowercase() };
    let path = match &m.path_specifier {
        Some(PathSpecifier::Prefix(p)) => PathMatch::Prefix(fold(p)),
        Some(PathSpecifier::Path(p)) => PathMatch::Exact(fold(p)),
        Some(PathSpecifier::PathSeparatedPrefix(p)) => {
            if p.contains(['?', '#']) || (p.ends_with('/') && p != "/") {
                return Err(FieldError::new("path_separated_prefix", "must not contain ? or # nor end with /"));
            }
            PathMatch::PathSeparatedPrefix(fold(p))
        }
        Some(PathSpecifier::SafeRegex(r)) => PathMatch::Regex(regex_matcher(r).at("safe_regex")?),
        Some(PathSpecifier::ConnectMatcher(_)) => return Err(FieldError::unsupported("connect_matcher")),
        Some(PathSpecifier::PathMatchPolicy(_)) => return Err(FieldError::unsupported("path_match_policy")),
        None => return Err(FieldError::new("", "a match needs one of prefix, path, safe_regex, path_separated_prefix")),
    };
    let headers = m
        .headers
        .iter()
        .enumerate()
        .map(|(i, h)| header_matcher(h).at(format!("headers[{i}]")))
        .collect::<FieldResult<Vec<_>>>()?;
    let query_parameters = m
        .query_parameters
        .iter()
        .enumerate()
        .map(|(i, q)| query_matcher(q).at(format!("query_parameters[{i}]")))
        .collect::<FieldResult<Vec<_>>>()?;
    Ok(RouteMatch { path, case_sensitive, headers, query_parameters })
}

pub(crate) fn header_matcher(h: &route::HeaderMatcher) -> FieldResult<HeaderMatcher> {
    use crate::model::matcher::{StringMatch, StringMatcher};
    use route::header_matcher::HeaderMatchSpecifier as Spec;
    if h.name.is_empty() {
        return Err(FieldError::new("name", "is required"));
    }
    let plain = |pattern| HeaderRule::String(StringMatcher { pattern, ignore_case: false });
    let rule = match &h.header_match_specifier {
        Some(Spec::ExactMatch(s)) => plain(StringMatch::Exact(s.clone())),
        Some(Spec::PrefixMatch(s)) => plain(StringMatch::Prefix(s.clone())),
        Some(Spec::SuffixMatch(s)) => plain(StringMatch::Suffix(s.clone())),
        Some(Spec::ContainsMatch(s)) => plain(StringMatch::Contains(s.clone())),
        Some(Spec::SafeRegexMatch(r)) => plain(StringMatch::Regex(regex_matcher(r).at("safe_regex_match")?)),
        Some(Spec::StringMatch(m)) => HeaderRule::String(string_matcher(m).at("string_match")?),
        Some(Spec::PresentMatch(p)) => HeaderRule::Present(*p),
        Some(Spec::RangeMatch(r)) => {
            if r.start >= r.end {
                return Err(FieldError::new("range_match", "start must be below end"));
            }
            HeaderRule::Range { start: r.start, end: r.end }
        }
        // Envoy: no specifier means "the header is present".
        None => HeaderRule::Present(true),
    };
    Ok(HeaderMatcher {
        name: h.name.to_ascii_lowercase(),
        rule,
        invert: h.invert_match,
        treat_missing_as_empty: h.treat_missing_header_as_empty,
    })
}

fn query_matcher(q: &route::QueryParameterMatcher) -> FieldResult<QueryParameterMatcher> {
    use route::query_parameter_matcher::QueryParameterMatchSpecifier as Spec;
    if q.name.is_empty() {
        return Err(FieldError::new("name", "is required"));
    }
    let value = match &q.query_parameter_match_specifier {
        Some(Spec::StringMatch(m)) => Some(string_matcher(m).at("string_match")?),
        Some(Spec::PresentMatch(true)) | None => None,
        Some(Spec::PresentMatch(false)) => {
            return Err(FieldError::new("present_match", "false is not meaningful; omit the matcher"))
        }
    };
    Ok(QueryParameterMatcher { name: q.name.clone(), value })
}

fn forward_action(a: &route::RouteAction) -> FieldResult<ForwardAction> {
    use route::route_action::{ClusterSpecifier, HostRewriteSpecifier};
    refuse_if(a.metadata_match.is_some(), "metadata_match")?;
    refuse_if(a.regex_rewrite.is_some(), "regex_rewrite")?;
    refuse_if(a.path_rewrite_policy.is_some(), "path_rewrite_policy")?;
    refuse_if(!a.path_rewrite.is_empty(), "path_rewrite")?;
    refuse_if(a.append_x_forwarded_host, "append_x_forwarded_host")?;
    refuse_if(a.idle_timeout.is_some(), "idle_timeout")?;
    refuse_if(a.retry_policy_typed_config.is_some(), "retry_policy_typed_config")?;
    // HIGH would select the clusters' HIGH circuit breakers, which meshctl does not have.
    refuse_if(a.priority != 0, "priority")?;
    refuse_if(a.cors.is_some(), "cors")?;
    refuse_if(a.internal_redirect_policy.is_some(), "internal_redirect_policy")?;
    refuse_if(a.hedge_policy.is_some(), "hedge_policy")?;
    refuse_if(a.early_data_policy.is_some(), "early_data_policy")?;
    let clusters = match &a.cluster_specifier {
        Some(ClusterSpecifier::Cluster(name)) if !name.is_empty() => ClusterChoice::Single { name: name.clone() },
        Some(ClusterSpecifier::Cluster(_)) => return Err(FieldError::new("cluster", "must not be empty")),
        Some(ClusterSpecifier::WeightedClusters(w)) => {
            ClusterChoice::Weighted(weighted_clusters(w).at("weighted_clusters")?)
        }
        Some(ClusterSpecifier::ClusterHeader(_)) => return Err(FieldError::unsupported("cluster_header")),
        Some(_) => return Err(FieldError::unsupported("cluster_specifier_plugin")),
        None => return Err(FieldError::new("", "a route action needs cluster or weighted_clusters")),
    };
    let host_rewrite = match &a.host_rewrite_specifier {
        Some(HostRewriteSpecifier::HostRewriteLiteral(h)) => {
            http::uri::Authority::try_from(h.as_str())
                .map_err(|_| FieldError::new("host_rewrite_literal", format!("{h:?} is not a valid host")))?;
            Some(h.clone())
        }
        Some(HostRewriteSpecifier::AutoHostRewrite(_)) => return Err(FieldError::unsupported("auto_host_rewrite")),
        Some(HostRewriteSpecifier::HostRewriteHeader(_)) => return Err(FieldError::unsupported("host_rewrite_header")),
        Some(HostRewriteSpecifier::HostRewritePathRegex(_)) => {
            return Err(FieldError::unsupported("host_rewrite_path_regex"))
        }
        Some(HostRewriteSpecifier::HostRewrite(_)) => return Err(FieldError::unsupported("host_rewrite")),
        None => None,
    };
    let timeout = match &a.timeout {
        Some(d) => Some(duration(d).at("timeout")?).filter(|d| !d.is_zero()),
        None => Some(DEFAULT_ROUTE_TIMEOUT),
    };
    let mut upgrades = Vec::new();
    for (i, u) in a.upgrade_configs.iter().enumerate() {
        refuse_if(u.connect_config.is_some(), "connect_config").at(format!("upgrade_configs[{i}]"))?;
        refuse_connect_upgrade(&u.upgrade_type).at(format!("upgrade_configs[{i}]"))?;
        if u.enabled.as_ref().map(|b| b.value).unwrap_or(true) {
            upgrades.push(u.upgrade_type.to_ascii_lowercase());
        } else {
            // A route that disables an upgrade the connection manager allows: not modelled yet.
            return Err(FieldError::new(format!("upgrade_configs[{i}].enabled"), "false is not supported by meshctl yet"));
        }
    }
    Ok(ForwardAction {
        clusters,
        prefix_rewrite: Some(a.prefix_rewrite.clone()).filter(|p| !p.is_empty()),
        host_rewrite,
        timeout,
        upgrades,
        retry_policy: a.retry_policy.as_ref().map(retry_policy).transpose().at("retry_policy")?.map(Arc::new),
        retry_buffer_limit: DEFAULT_RETRY_BUFFER_LIMIT,
        mirrors: a
            .request_mirror_policies
            .iter()
            .enumerate()
            .map(|(i, p)| mirror_policy(p).at(format!("request_mirror_policies[{i}]")))
            .collect::<FieldResult<Vec<_>>>()?,
    })
}

/// CONNECT as an upgrade type enables Envoy's CONNECT handling (forwarding the CONNECT, or
/// terminating it with connect_config), which meshctl does not implement: without it a CONNECT
/// matches no route and is answered 404, so accepting the setting would silently change nothing.
pub(crate) fn refuse_connect_upgrade(upgrade_type: &str) -> FieldResult<()> {
    if upgrade_type.eq_ignore_ascii_case("CONNECT") {
        return Err(FieldError::new(
            "upgrade_type",
            "CONNECT is not supported by meshctl yet (no CONNECT forwarding or termination: a CONNECT request matches no route and gets 404)",
        ));
    }
    Ok(())
}

fn weighted_clusters(w: &route::WeightedCluster) -> FieldResult<WeightedClusters> {
    refuse_if(!w.runtime_key_prefix.is_empty(), "runtime_key_prefix")?;
    refuse_if(w.random_value_specifier.is_some(), "random_value_specifier")?;
    if w.clusters.is_empty() {
        return Err(FieldError::new("clusters", "must list at least one cluster"));
    }
    let mut clusters = Vec::with_capacity(w.clusters.len());
    for (i, c) in w.clusters.iter().enumerate() {
        let at = format!("clusters[{i}]");
        if c.name.is_empty() {
            return Err(FieldError::new(format!("{at}.name"), "is required"));
        }
        refuse_if(!c.cluster_header.is_empty(), "cluster_header").at(&at)?;
        refuse_if(c.metadata_match.is_some(), "metadata_match").at(&at)?;
        refuse_if(!c.typed_per_filter_config.is_empty(), "typed_per_filter_config").at(&at)?;
        refuse_if(c.host_rewrite_specifier.is_some(), "host_rewrite_literal").at(&at)?;
        clusters.push(WeightedCluster {
            name: c.name.clone(),
            weight: c.weight.as_ref().map(|v| v.value).unwrap_or(0),
            request_headers: header_mutation(&c.request_headers_to_add, &c.request_headers_to_remove)
                .at(format!("{at}.request_headers_to_add"))?,
            response_headers: header_mutation(&c.response_headers_to_add, &c.response_headers_to_remove)
                .at(format!("{at}.response_headers_to_add"))?,
        });
    }
    let cumulative = cumulative_weights(clusters.iter().map(|c| c.weight as u64));
    let total = *cumulative.last().unwrap_or(&0);
    if total == 0 {
        return Err(FieldError::new("clusters", "the weights sum to 0; at least one cluster needs a positive weight"));
    }
    if let Some(declared) = &w.total_weight {
        if declared.value as u64 != total {
            return Err(FieldError::new(
                "total_weight",
                format!("is {} but the cluster weights sum to {total}", declared.value),
            ));
        }
    }
    Ok(WeightedClusters { clusters, cumulative })
}

fn redirect_action(a: &route::RedirectAction) -> FieldResult<RedirectAction> {
    use route::redirect_action::{PathRewriteSpecifier, SchemeRewriteSpecifier};
    let scheme = match &a.scheme_rewrite_specifier {
        Some(SchemeRewriteSpecifier::HttpsRedirect(true)) => Some("https".to_string()),
        Some(SchemeRewriteSpecifier::HttpsRedirect(false)) | None => None,
        Some(SchemeRewriteSpecifier::SchemeRedirect(s)) => Some(s.to_ascii_lowercase()),
    };
    let (path, prefix_rewrite) = match &a.path_rewrite_specifier {
        Some(PathRewriteSpecifier::PathRedirect(p)) => (Some(p.clone()), None),
        Some(PathRewriteSpecifier::PrefixRewrite(p)) => (None, Some(p.clone())),
        Some(PathRewriteSpecifier::RegexRewrite(_)) => return Err(FieldError::unsupported("regex_rewrite")),
        Some(PathRewriteSpecifier::PathRewrite(_)) => return Err(FieldError::unsupported("path_rewrite")),
        None => (None, None),
    };
    let status = match a.response_code {
        0 => StatusCode::MOVED_PERMANENTLY,
        1 => StatusCode::FOUND,
        2 => StatusCode::SEE_OTHER,
        3 => StatusCode::TEMPORARY_REDIRECT,
        4 => StatusCode::PERMANENT_REDIRECT,
        other => return Err(FieldError::new("response_code", format!("unknown value {other}"))),
    };
    let port = match a.port_redirect {
        0 => None,
        p => Some(u16::try_from(p).map_err(|_| FieldError::new("port_redirect", format!("{p} is not a port")))?),
    };
    Ok(RedirectAction {
        scheme,
        host: Some(a.host_redirect.clone()).filter(|h| !h.is_empty()),
        port,
        path,
        prefix_rewrite,
        strip_query: a.strip_query,
        status,
    })
}

fn direct_response(a: &route::DirectResponseAction) -> FieldResult<DirectResponseAction> {
    refuse_if(a.body_format.is_some(), "body_format")?;
    let status = u16::try_from(a.status)
        .ok()
        .filter(|s| (200..600).contains(s))
        .and_then(|s| StatusCode::from_u16(s).ok())
        .ok_or_else(|| FieldError::new("status", format!("{} is not an HTTP status in [200, 600)", a.status)))?;
    let body = match &a.body {
        Some(source) => {
            let (bytes, _) = data_source(source).at("body")?;
            // Envoy's default max_direct_response_body_size_bytes.
            if bytes.len() > 4096 {
                return Err(FieldError::new("body", "is larger than 4096 bytes"));
            }
            Some(bytes::Bytes::from(bytes))
        }
        None => None,
    };
    Ok(DirectResponseAction { status, body })
}

