//! Request policy: path normalization before routing, RBAC authorization (Envoy's RBAC filter),
//! and fault injection (Envoy's fault filter).

pub mod evaluate;
pub mod fault;
pub mod model;
pub mod path;
