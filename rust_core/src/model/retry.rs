//! Retry policies (Envoy's RetryPolicy): which failed tries are tried again, how often, how soon.

use std::time::Duration;

use serde::Serialize;

use super::route::HeaderMatcher;

/// The request body kept for replaying it to a retry when the route says nothing: Linkerd's
/// bound. Envoy's default is the listener's per_connection_buffer_limit_bytes (1 MiB).
pub const DEFAULT_RETRY_BUFFER_LIMIT: usize = 64 * 1024;

/// One route's retry policy, resolved when the route is decoded (the route's own, else its
/// virtual host's: Envoy does not merge the two).
#[derive(Debug, Serialize)]
pub struct RetryPolicy {
    pub retry_on: RetryOn,
    /// For `retriable-status-codes`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub retriable_status_codes: Vec<u16>,
    /// Retries after the first try (Envoy's default: 1).
    pub num_retries: u32,
    /// None: a try may take until the route's timeout.
    #[serde(with = "super::optional_millis")]
    pub per_try_timeout: Option<Duration>,
    /// envoy.retry_host_predicates.previous_hosts: a retry avoids the endpoints already tried.
    pub avoid_previous_hosts: bool,
    /// Extra picks a retry may make to find an endpoint the predicate accepts (Envoy's
    /// host_selection_retry_max_attempts); the last pick is used when none is accepted.
    pub host_selection_retry_max_attempts: u32,
    pub backoff: RetryBackoff,
    /// Only requests matching one of these are retried (none: every request).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub retriable_request_headers: Vec<HeaderMatcher>,
}

/// Envoy's fully jittered exponential backoff: the n-th retry waits a uniformly random time
/// below min(base × 2^(n-1), max).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RetryBackoff {
    #[serde(with = "super::millis")]
    pub base_interval: Duration,
    #[serde(with = "super::millis")]
    pub max_interval: Duration,
}

impl Default for RetryBackoff {
    fn default() -> Self {
        // Envoy's upstream.base_retry_backoff_ms, and a maximum of ten times the base.
        RetryBackoff { base_interval: Duration::from_millis(25), max_interval: Duration::from_millis(250) }
    }
}

/// The `retry_on` conditions, as bits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetryOn(u32);

impl RetryOn {
    pub const SERVER_ERROR: RetryOn = RetryOn(1 << 0);
    pub const GATEWAY_ERROR: RetryOn = RetryOn(1 << 1);
    pub const RESET: RetryOn = RetryOn(1 << 2);
    pub const RESET_BEFORE_REQUEST: RetryOn = RetryOn(1 << 3);
    pub const CONNECT_FAILURE: RetryOn = RetryOn(1 << 4);
    pub const REFUSED_STREAM: RetryOn = RetryOn(1 << 5);
    pub const RETRIABLE_4XX: RetryOn = RetryOn(1 << 6);
    pub const RETRIABLE_STATUS_CODES: RetryOn = RetryOn(1 << 7);
    pub const ENVOY_RATE_LIMITED: RetryOn = RetryOn(1 << 8);
    pub const GRPC_CANCELLED: RetryOn = RetryOn(1 << 9);
    pub const GRPC_DEADLINE_EXCEEDED: RetryOn = RetryOn(1 << 10);
    pub const GRPC_INTERNAL: RetryOn = RetryOn(1 << 11);
    pub const GRPC_RESOURCE_EXHAUSTED: RetryOn = RetryOn(1 << 12);
    pub const GRPC_UNAVAILABLE: RetryOn = RetryOn(1 << 13);
    /// Accepted and never true: it concerns HTTP/3 upstreams, which meshctl does not have.
    pub const HTTP3_POST_CONNECT_FAILURE: RetryOn = RetryOn(1 << 14);

    /// Envoy's spelling of each condition.
    pub const NAMES: [(&'static str, RetryOn); 15] = [
        ("5xx", RetryOn::SERVER_ERROR),
        ("gateway-error", RetryOn::GATEWAY_ERROR),
        ("reset", RetryOn::RESET),
        ("reset-before-request", RetryOn::RESET_BEFORE_REQUEST),
        ("connect-failure", RetryOn::CONNECT_FAILURE),
        ("refused-stream", RetryOn::REFUSED_STREAM),
        ("retriable-4xx", RetryOn::RETRIABLE_4XX),
        ("retriable-status-codes", RetryOn::RETRIABLE_STATUS_CODES),
        ("envoy-ratelimited", RetryOn::ENVOY_RATE_LIMITED),
        ("cancelled", RetryOn::GRPC_CANCELLED),
        ("deadline-exceeded", RetryOn::GRPC_DEADLINE_EXCEEDED),
        ("internal", RetryOn::GRPC_INTERNAL),
        ("resource-exhausted", RetryOn::GRPC_RESOURCE_EXHAUSTED),
        ("unavailable", RetryOn::GRPC_UNAVAILABLE),
        ("http3-post-connect-failure", RetryOn::HTTP3_POST_CONNECT_FAILURE),
    ];

    pub const GRPC: RetryOn = RetryOn(
        RetryOn::GRPC_CANCELLED.0
            | RetryOn::GRPC_DEADLINE_EXCEEDED.0
            | RetryOn::GRPC_INTERNAL.0
            | RetryOn::GRPC_RESOURCE_EXHAUSTED.0
            | RetryOn::GRPC_UNAVAILABLE.0,
    );

    pub fn contains(self, other: RetryOn) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn intersects(self, other: RetryOn) -> bool {
        self.0 & other.0 != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl std::ops::BitOr for RetryOn {
    type Output = RetryOn;
    fn bitor(self, other: RetryOn) -> RetryOn {
        RetryOn(self.0 | other.0)
    }
}

impl std::ops::BitOrAssign for RetryOn {
    fn bitor_assign(&mut self, other: RetryOn) {
        self.0 |= other.0;
    }
}

/// In /config_dump as Envoy's comma-separated list.
impl Serialize for RetryOn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let names: Vec<&str> = RetryOn::NAMES.iter().filter(|(_, bit)| self.contains(*bit)).map(|(name, _)| *name).collect();
        s.serialize_str(&names.join(","))
    }
}
