//! Request policy: path normalization before routing, RBAC authorization (Envoy's RBAC filter),
//! fault injection (Envoy's fault filter), local rate limits (Envoy's local_ratelimit filter) and
//! adaptive concurrency (Envoy's adaptive_concurrency filter).

pub mod adaptive_concurrency;
pub mod evaluate;
pub mod fault;
pub mod local_ratelimit;
pub mod quota;
pub mod model;
pub mod path;
