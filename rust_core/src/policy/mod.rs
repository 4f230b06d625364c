//! Request policy: path normalization before routing, RBAC authorization (Envoy's RBAC filter),
//! fault injection (Envoy's fault filter) and local rate limits (Envoy's local_ratelimit filter).

pub mod evaluate;
pub mod fault;
pub mod local_ratelimit;
pub mod quota;
pub mod model;
pub mod path;
