//! Route configuration: virtual hosts selected by authority, routes matched in order, and actions.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use regex::Regex;
use serde::Serialize;

use super::headers::HeaderMutation;
use super::matcher::{serialize_regex, StringMatcher};
use crate::telemetry::metrics::RouteStats;

#[derive(Debug, Serialize)]
pub struct RouteConfig {
    pub name: String,
    pub virtual_hosts: Vec<VirtualHost>,
    pub ignore_port_in_host_matching: bool,
    #[serde(skip_serializing_if = "HeaderMutation::is_empty")]
    pub request_headers: HeaderMutation,
    #[serde(skip_serializing_if = "HeaderMutation::is_empty")]
    pub response_headers: HeaderMutation,
    #[serde(skip)]
    pub domains: DomainIndex,
}

/// Virtual-host lookup tables in Envoy's order: exact, longest `*.suffix`, longest `prefix.*`, `*`.
#[derive(Debug, Default)]
pub struct DomainIndex {
    pub exact: HashMap<String, usize>,
    /// (suffix including the leading character after `*`, vhost index), longest first.
    pub suffixes: Vec<(String, usize)>,
    /// (prefix without the trailing `*`, vhost index), longest first.
    pub prefixes: Vec<(String, usize)>,
    pub wildcard: Option<usize>,
}

#[derive(Debug, Serialize)]
pub struct VirtualHost {
    pub name: String,
    pub domains: Vec<String>,
    pub routes: Vec<Route>,
    #[serde(skip_serializing_if = "HeaderMutation::is_empty")]
    pub request_headers: HeaderMutation,
    #[serde(skip_serializing_if = "HeaderMutation::is_empty")]
    pub response_headers: HeaderMutation,
    /// Send x-envoy-attempt-count (1 for the first try) with every upstream request.
    pub include_request_attempt_count: bool,
    /// Return x-envoy-attempt-count (the tries made) with the response.
    pub include_attempt_count_in_response: bool,
    /// The virtual host's rate-limit policies (descriptors for the local rate limit filter).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rate_limits: Vec<super::local_ratelimit::RateLimitPolicy>,
}

#[derive(Debug, Serialize)]
pub struct Route {
    pub name: String,
    #[serde(rename = "match")]
    pub matcher: RouteMatch,
    pub action: Action,
    #[serde(skip_serializing_if = "HeaderMutation::is_empty")]
    pub request_headers: HeaderMutation,
    #[serde(skip_serializing_if = "HeaderMutation::is_empty")]
    pub response_headers: HeaderMutation,
    /// The route's own fault filter config (typed_per_filter_config): it replaces the
    /// connection manager's whole, and applies only where that manager has the fault filter.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault: Option<Arc<super::fault::FaultPolicy>>,
    /// The most specific local rate limit config of each filter instance, keyed by the
    /// instance's name (typed_per_filter_config's key): the route's own, else its virtual
    /// host's, else its route config's. One applies only where the connection manager has a
    /// filter of that name, and then replaces that filter's config whole.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub local_rate_limits: Vec<(String, Arc<super::local_ratelimit::LocalRateLimit>)>,
    /// The route action's rate-limit policies.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rate_limits: Vec<super::local_ratelimit::RateLimitPolicy>,
    /// The route action's include_vh_rate_limits: the virtual host's policies are added always.
    pub include_vh_rate_limits: bool,
    /// The decorator's operation: the name of the spans of requests on this route.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decorator: Option<Arc<str>>,
    #[serde(skip)]
    pub stats: Arc<RouteStats>,
}

impl Route {
    /// The per-route local rate limit config for the filter instance named `filter`.
    pub fn local_rate_limit(&self, filter: &str) -> Option<&super::local_ratelimit::LocalRateLimit> {
        self.local_rate_limits.iter().find(|(name, _)| name == filter).map(|(_, config)| &**config)
    }
}

#[derive(Debug, Serialize)]
pub struct RouteMatch {
    pub path: PathMatch,
    pub case_sensitive: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatcher>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub query_parameters: Vec<QueryParameterMatcher>,
}

#[derive(Debug, Serialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum PathMatch {
    /// Stored lower-cased when the route is case-insensitive.
    Prefix(String),
    Exact(String),
    PathSeparatedPrefix(String),
    Regex(#[serde(serialize_with = "serialize_regex")] Regex),
}

#[derive(Debug, Serialize)]
pub struct HeaderMatcher {
    /// Lower-case; pseudo-headers (`:method`, `:path`, `:authority`, `:scheme`) included.
    pub name: String,
    pub rule: HeaderRule,
    pub invert: bool,
    pub treat_missing_as_empty: bool,
}

#[derive(Debug, Serialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum HeaderRule {
    Present(bool),
    String(StringMatcher),
    Range { start: i64, end: i64 },
}

#[derive(Debug, Serialize)]
pub struct QueryParameterMatcher {
    pub name: String,
    /// None: the parameter must be present.
    pub value: Option<StringMatcher>,
}

#[derive(Debug, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Action {
    Forward(ForwardAction),
    Redirect(RedirectAction),
    DirectResponse(DirectResponseAction),
}

#[derive(Debug, Serialize)]
pub struct ForwardAction {
    pub clusters: ClusterChoice,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix_rewrite: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_rewrite: Option<String>,
    /// None disables the timeout (Envoy's `timeout: 0s`).
    #[serde(with = "super::optional_millis")]
    pub timeout: Option<Duration>,
    /// Upgrade protocols (lower-case, e.g. "websocket") this route lets through.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub upgrades: Vec<String>,
    /// The route's retry policy, else its virtual host's; None: every request is tried once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_policy: Option<Arc<super::retry::RetryPolicy>>,
    /// Request bodies longer than this are sent once and never retried (bytes).
    pub retry_buffer_limit: usize,
    /// Clusters that get a copy of (a share of) the requests; empty for most routes.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<super::fault::MirrorPolicy>,
}

#[derive(Debug, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ClusterChoice {
    Single { name: String },
    Weighted(WeightedClusters),
}

#[derive(Debug, Serialize)]
pub struct WeightedClusters {
    pub clusters: Vec<WeightedCluster>,
    /// Running sums of the weights, for picking by one random draw.
    #[serde(skip)]
    pub cumulative: Vec<u64>,
}

#[derive(Debug, Serialize)]
pub struct WeightedCluster {
    pub name: String,
    pub weight: u32,
    #[serde(skip_serializing_if = "HeaderMutation::is_empty")]
    pub request_headers: HeaderMutation,
    #[serde(skip_serializing_if = "HeaderMutation::is_empty")]
    pub response_headers: HeaderMutation,
}

#[derive(Debug, Serialize)]
pub struct RedirectAction {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix_rewrite: Option<String>,
    pub strip_query: bool,
    #[serde(serialize_with = "serialize_status")]
    pub status: StatusCode,
}

#[derive(Debug, Serialize)]
pub struct DirectResponseAction {
    #[serde(serialize_with = "serialize_status")]
    pub status: StatusCode,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "serialize_body")]
    pub body: Option<bytes::Bytes>,
}

fn serialize_body<S: serde::Serializer>(body: &Option<bytes::Bytes>, s: S) -> Result<S::Ok, S::Error> {
    match body {
        Some(bytes) => s.serialize_str(&String::from_utf8_lossy(bytes)),
        None => s.serialize_none(),
    }
}

fn serialize_status<S: serde::Serializer>(status: &StatusCode, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u16(status.as_u16())
}

impl WeightedClusters {
    /// The cluster chosen for a draw in `[0, total)`: the first whose running sum exceeds it.
    pub fn pick(&self, draw: u64) -> &WeightedCluster {
        &self.clusters[pick_index(&self.cumulative, draw)]
    }

    pub fn total(&self) -> u64 {
        *self.cumulative.last().unwrap_or(&0)
    }
}

/// Index of the first running sum strictly greater than `draw` (draw < total).
pub fn pick_index(cumulative: &[u64], draw: u64) -> usize {
    cumulative.partition_point(|&sum| sum <= draw).min(cumulative.len().saturating_sub(1))
}

/// Running sums of a weight vector.
pub fn cumulative_weights(weights: impl IntoIterator<Item = u64>) -> Vec<u64> {
    weights
        .into_iter()
        .scan(0u64, |sum, w| {
            *sum += w;
            Some(*sum)
        })
        .collect()
}
