//! The admin HTTP endpoint (loopback by default): /ready, /stats/prometheus, /config_dump.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::http::body::ResponseBody;

/// What the admin endpoint reports; implemented by the engine's assembly.
pub trait AdminSource: Send + Sync + 'static {
    fn is_draining(&self) -> bool;
    fn stats_prometheus(&self) -> String;
    fn config_dump(&self) -> String;
}

/// Serve admin requests on an already bound socket until `stop` flips to true.
pub fn spawn(socket: std::net::TcpListener, source: Arc<dyn AdminSource>, mut stop: watch::Receiver<bool>) -> std::io::Result<SocketAddr> {
    let address = socket.local_addr()?;
    let listener = TcpListener::from_std(socket)?;
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                accepted = listener.accept() => match accepted { Ok(c) => c, Err(_) => continue },
                _ = stop.wait_for(|s| *s) => return,
            };
            let source = source.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    let source = source.clone();
                    async move { Ok::<_, Infallible>(respond(&*source, &request)) }
                });
                let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    Ok(address)
}

fn respond(source: &dyn AdminSource, request: &Request<Incoming>) -> Response<ResponseBody> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "use GET\n".into());
    }
    match request.uri().path() {
        "/ready" if source.is_draining() => reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "DRAINING\n".into()),
        "/ready" => reply(StatusCode::OK, "text/plain", "LIVE\n".into()),
        "/stats/prometheus" => reply(StatusCode::OK, "text/plain; version=0.0.4", source.stats_prometheus()),
        "/config_dump" => reply(StatusCode::OK, "application/json", source.config_dump()),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "admin endpoints: /ready /stats/prometheus /config_dump\n".into()),
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::text(body));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}
