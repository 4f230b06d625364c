//! Transport: listeners, protocol detection, filter-chain selection, TLS, and opaque TCP proxying.

pub mod activity;
pub mod chain;
pub mod detect;
pub mod listener;
pub mod prefixed;
pub mod tcp_proxy;
pub mod tls;
