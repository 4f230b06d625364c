//! A cluster's fallback (meshctl's Fallback resource): when it answers instead of the cluster,
//! the destination breaker that can trip it, and what it answers with.

use std::time::Duration;

use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FallbackConfig {
    /// The Fallback resource, `namespace/name`.
    pub fallback: String,
    /// The guarded host: the `host` label of meshctl_fallback_total.
    pub host: String,
    /// The reasons it applies on, a bit per FallbackReason.
    pub on: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub breaker: Option<BreakerConfig>,
    pub target: FallbackTarget,
}

impl FallbackConfig {
    pub fn applies_on(&self, reason: FallbackReason) -> bool {
        self.on & reason.bit() != 0
    }
}

/// Why a fallback answered (x-meshctl-fallback and the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FallbackReason {
    BreakerOpen,
    NoHealthyUpstream,
    Timeout,
    ServerError,
    Overflow,
}

impl FallbackReason {
    pub const ALL: [FallbackReason; 5] = [
        FallbackReason::BreakerOpen,
        FallbackReason::NoHealthyUpstream,
        FallbackReason::Timeout,
        FallbackReason::ServerError,
        FallbackReason::Overflow,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FallbackReason::BreakerOpen => "breaker-open",
            FallbackReason::NoHealthyUpstream => "no-healthy-upstream",
            FallbackReason::Timeout => "timeout",
            FallbackReason::ServerError => "5xx",
            FallbackReason::Overflow => "overflow",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|reason| reason.as_str() == text)
    }

    pub fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// A destination-level breaker in Sentinel's and resilience4j's sense: over a sliding window,
/// the share of failed or slow calls opens it; after `open_for` one probe decides.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BreakerConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_ratio: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slow_call_ratio: Option<f64>,
    #[serde(with = "super::optional_millis")]
    pub slow_call_duration: Option<Duration>,
    pub min_requests: u32,
    #[serde(with = "super::millis")]
    pub window: Duration,
    #[serde(with = "super::millis")]
    pub open_for: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FallbackTarget {
    /// Send the request to this cluster instead (a degraded version of the service).
    Cluster(String),
    /// Answer this.
    Response { status: u16, headers: Vec<(String, String)>, body: String },
}
