//! The RBAC model: a connection manager's ordered RBAC filters, their policies and matchers.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use serde::Serialize;

use crate::model::matcher::StringMatcher;
use crate::model::route::HeaderMatcher;

/// What a filter does when one of its policies matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RbacAction {
    /// Requests that match no policy are denied.
    Allow,
    /// Requests that match any policy are denied.
    Deny,
}

impl RbacAction {
    pub fn label(self) -> &'static str {
        match self {
            RbacAction::Allow => "ALLOW",
            RbacAction::Deny => "DENY",
        }
    }
}

/// The RBAC filters of one connection manager, in filter order.
#[derive(Debug, Default, Serialize)]
pub struct RbacFilters {
    pub filters: Vec<RbacFilter>,
    /// Requests that passed every filter (only counted when there is at least one).
    #[serde(skip)]
    pub allowed: Arc<AtomicU64>,
}

#[derive(Debug, Serialize)]
pub struct RbacFilter {
    pub action: RbacAction,
    /// Sorted by name: Envoy evaluates its policy map in name order, which decides which DENY
    /// policy a denial is reported under.
    pub policies: Vec<Policy>,
    /// Denials by an ALLOW filter (no policy matched); DENY filters count per policy instead.
    #[serde(skip)]
    pub denied_unmatched: Arc<AtomicU64>,
}

/// A policy matches when any permission and any principal match.
#[derive(Debug, Serialize)]
pub struct Policy {
    pub name: String,
    pub permissions: Vec<Permission>,
    pub principals: Vec<Principal>,
    /// Denials under this policy's name (DENY filters only).
    #[serde(skip)]
    pub denied: Arc<AtomicU64>,
}

/// What the request does (Envoy's Permission, the supported subset).
#[derive(Debug, Serialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum Permission {
    Any,
    And(Vec<Permission>),
    Or(Vec<Permission>),
    Not(Box<Permission>),
    /// Matched against the normalized path without its query string.
    UrlPath(StringMatcher),
    Header(HeaderMatcher),
    /// The port the connection was addressed to (the original one for redirected connections).
    DestinationPort(u16),
}

/// Who is asking (Envoy's Principal, the supported subset).
#[derive(Debug, Serialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum Principal {
    Any,
    And(Vec<Principal>),
    Or(Vec<Principal>),
    Not(Box<Principal>),
    /// The verified peer certificate's identity (its SPIFFE URI); None matches any
    /// authenticated peer. Never matches a connection without a verified client certificate.
    Authenticated(Option<StringMatcher>),
    Header(HeaderMatcher),
}
