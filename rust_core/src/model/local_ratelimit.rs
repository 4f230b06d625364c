//! Envoy's HTTP local rate limit filter as configured (on the connection manager, a route config,
//! a virtual host or a route), and the rate-limit policies (actions) that make request descriptors.

use std::sync::Arc;

use http::StatusCode;
use serde::Serialize;

use super::fault::Share;
use super::headers::HeaderMutation;
use super::route::HeaderMatcher;
use crate::policy::local_ratelimit::{BucketSpec, Descriptor, Limiter};
use crate::telemetry::metrics::{LocalRateLimitDescriptorStats, LocalRateLimitStats};

/// One LocalRateLimit config. Its buckets live with it: a per-route config's bucket is that
/// route's, shared by every connection unless `per_connection`.
#[derive(Debug, Serialize)]
pub struct LocalRateLimit {
    pub stat_prefix: String,
    /// None: no default bucket (allowed only on the connection manager's config); requests no
    /// descriptor limits pass.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_bucket: Option<BucketSpec>,
    /// filter_enabled's default_value; Envoy's default (field absent) is 0 %: the filter is off.
    pub enabled: Share,
    /// filter_enforced's default_value; absent is 0 %: limited requests pass (shadow mode).
    pub enforced: Share,
    #[serde(serialize_with = "serialize_status")]
    pub status: StatusCode,
    #[serde(skip_serializing_if = "HeaderMutation::is_empty")]
    pub response_headers: HeaderMutation,
    #[serde(skip_serializing_if = "HeaderMutation::is_empty")]
    pub request_headers_when_not_enforced: HeaderMutation,
    pub per_connection: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub descriptors: Vec<(Descriptor, BucketSpec)>,
    pub always_consume_default: bool,
    /// gRPC requests get RESOURCE_EXHAUSTED (8) instead of the status' gRPC mapping.
    pub rate_limited_as_resource_exhausted: bool,
    /// Only route / virtual-host rate-limit policies of this stage make descriptors.
    pub stage: u32,
    pub vh_rate_limits: VhRateLimits,
    /// The config's own rate_limits: when set, they make the descriptors instead of the route's.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rate_limits: Vec<RateLimitPolicy>,
    /// The shared buckets (unused when per_connection: each connection makes its own).
    #[serde(skip)]
    pub limiter: Limiter,
    #[serde(skip)]
    pub stats: Arc<LocalRateLimitStats>,
    /// Each of `descriptors`' counters, in its order: made with the config, shared by every
    /// limiter made from it, so counting a request only indexes into it.
    #[serde(skip)]
    pub descriptor_stats: Vec<Arc<LocalRateLimitDescriptorStats>>,
}

impl LocalRateLimit {
    pub fn make_limiter(&self) -> Limiter {
        Limiter::new(self.token_bucket, &self.descriptors, self.always_consume_default)
    }
}

fn serialize_status<S: serde::Serializer>(status: &StatusCode, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u16(status.as_u16())
}

/// Envoy's VhRateLimitsOptions: whether the virtual host's policies add to the route's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum VhRateLimits {
    /// The virtual host's policies only when the route has none (Envoy's default).
    Override,
    Include,
    Ignore,
}

/// A route's or virtual host's RateLimit: its actions together make one descriptor, or none when
/// one action produces nothing.
#[derive(Debug, Serialize)]
pub struct RateLimitPolicy {
    pub stage: u32,
    /// Envoy's local filter skips a policy with a disable_key (it names a runtime key).
    pub disabled: bool,
    pub actions: Vec<RateLimitAction>,
}

#[derive(Debug, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RateLimitAction {
    /// (descriptor_key, the header's value); a missing header voids the descriptor unless
    /// skip_if_absent, which only skips this entry.
    RequestHeaders { header_name: String, descriptor_key: String, skip_if_absent: bool },
    /// ("remote_address", the client's IP address).
    RemoteAddress,
    /// (descriptor_key or "generic_key", descriptor_value).
    GenericKey { descriptor_key: String, descriptor_value: String },
    /// (descriptor_key or "header_match", descriptor_value) when the headers match as expected.
    HeaderValueMatch { descriptor_key: String, descriptor_value: String, expect_match: bool, headers: Vec<HeaderMatcher> },
    /// ("destination_cluster", the route's cluster).
    DestinationCluster,
}
