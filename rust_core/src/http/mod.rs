//! HTTP: the downstream server (HTTP/1.1 and HTTP/2 via hyper), routing, and the proxying handler.

pub mod access_log;
pub mod body;
pub mod fallback;
pub mod global_ratelimit;
pub mod grpc_unary;
pub mod istio_stats;
pub mod local_reply;
pub mod mirror;
pub mod proxy;
pub mod replay_body;
pub mod request_body;
pub mod retry;
pub mod routing;
pub mod server;
pub mod trace_span;
pub mod upstream_request;
pub mod xfcc;
