//! Fault injection and request mirroring as a route asks for them: delays and aborts for a share
//! of requests (Envoy's HTTP fault filter), and copies of requests sent to another cluster.

use std::time::Duration;

use http::StatusCode;
use serde::Serialize;

/// A share of requests, in millionths (Envoy's finest FractionalPercent denominator).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Share {
    pub per_million: u32,
}

impl Share {
    pub const ALL: Share = Share { per_million: 1_000_000 };
    pub const NONE: Share = Share { per_million: 0 };

    /// One independent draw per request: true for about `per_million` in a million.
    pub fn sample(self) -> bool {
        match self.per_million {
            0 => false,
            p if p >= 1_000_000 => true,
            p => fastrand::u32(..1_000_000) < p,
        }
    }
}

/// What the fault filter does to a request: first the delay, then the abort, each drawn alone.
#[derive(Debug, Default, Serialize)]
pub struct FaultPolicy {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

impl FaultPolicy {
    pub fn is_empty(&self) -> bool {
        self.delay.is_none() && self.abort.is_none()
    }
}

#[derive(Debug, Serialize)]
pub struct FaultDelay {
    #[serde(with = "super::millis")]
    pub duration: Duration,
    pub share: Share,
}

#[derive(Debug, Serialize)]
pub struct FaultAbort {
    pub status: AbortStatus,
    pub share: Share,
    /// The local reply's body; Envoy's "fault filter abort" when the config gives none.
    pub body: String,
}

#[derive(Debug, Clone, Copy, Serialize)]
#[serde(tag = "kind", content = "code", rename_all = "snake_case")]
pub enum AbortStatus {
    Http(#[serde(serialize_with = "serialize_status")] StatusCode),
    /// A gRPC status code (0-16): answered as a trailers-only gRPC response.
    Grpc(u32),
}

fn serialize_status<S: serde::Serializer>(status: &StatusCode, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u16(status.as_u16())
}

/// A route's request mirror: a copy of a share of its requests goes to `cluster`, and its
/// answer is thrown away.
#[derive(Debug, Serialize)]
pub struct MirrorPolicy {
    pub cluster: String,
    pub share: Share,
    /// Append "-shadow" to the copy's host (Envoy's default), so the mirror can tell copies apart.
    pub shadow_host_suffix: bool,
}
