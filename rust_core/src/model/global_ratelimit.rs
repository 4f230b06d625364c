//! Envoy's HTTP global rate limit filter (envoy.filters.http.ratelimit) as configured: which
//! rate limit service to ask, for which domain and stage, and what to answer when it says no or fails.

use std::time::Duration;

use http::StatusCode;
use serde::Serialize;

use crate::policy::quota::QuotaCache;

#[derive(Debug, Serialize)]
pub struct GlobalRateLimit {
    pub domain: String,
    /// Only route / virtual-host rate-limit policies of this stage make descriptors (always 0).
    pub stage: u32,
    pub request_type: RequestType,
    /// The whole call's deadline (Envoy's default 20 ms); past it the call is an error.
    #[serde(with = "super::millis")]
    pub timeout: Duration,
    /// An error or timeout refuses the request (status_on_error, flag RLSE) instead of letting
    /// it pass (Envoy's default: fail open).
    pub failure_mode_deny: bool,
    /// The cluster (of the bootstrap or CDS) the rate limit service is reached through.
    pub cluster: String,
    /// The calls' :authority (envoy_grpc.authority; by default the cluster's name, as in Envoy,
    /// with characters an authority may not hold as `-`: Istio's names contain `|`).
    #[serde(serialize_with = "serialize_authority")]
    pub authority: http::uri::Authority,
    #[serde(serialize_with = "serialize_status")]
    pub rate_limited_status: StatusCode,
    #[serde(serialize_with = "serialize_status")]
    pub status_on_error: StatusCode,
    /// gRPC requests limited get RESOURCE_EXHAUSTED (8) instead of UNAVAILABLE (14).
    pub rate_limited_as_resource_exhausted: bool,
    /// Not Envoy's x-envoy-ratelimited header on limited replies (disable_x_envoy_ratelimited_header).
    pub omit_ratelimited_header: bool,
    /// Requests the service granted in advance (meshctl's quota extension), per descriptor. Lives
    /// with this config: a new config starts with none.
    #[serde(skip)]
    pub quota: QuotaCache,
}

/// Envoy's request_type: which requests the filter applies to, by x-envoy-internal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestType {
    Both,
    Internal,
    External,
}

fn serialize_status<S: serde::Serializer>(status: &StatusCode, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u16(status.as_u16())
}

fn serialize_authority<S: serde::Serializer>(authority: &http::uri::Authority, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(authority.as_str())
}
