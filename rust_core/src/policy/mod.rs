//! Request policy: path normalization before routing, and RBAC authorization (Envoy's RBAC filter).

pub mod evaluate;
pub mod model;
pub mod path;
