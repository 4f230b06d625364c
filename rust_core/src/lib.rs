//! meshctl's data-plane engine: listeners, protocol detection, TLS, HTTP proxying and the
//! xDS decoder that feeds its typed model. Pure Rust; the PyO3 bindings live in the root crate.

pub mod admin;
pub mod engine;
pub mod http;
pub mod model;
pub mod policy;
pub mod registry;
pub mod runtime;
pub mod telemetry;
pub mod transport;
pub mod upstream;
pub mod xds;

pub use engine::{Engine, EngineOptions};
pub use xds::ConfigError;
