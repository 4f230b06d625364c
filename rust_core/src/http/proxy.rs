//! The per-request handler: route the request, then forward it, redirect, or answer directly.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::body::ResponseBody;
use super::fallback::{self, BreakerCall};
use super::global_ratelimit::{self, Decision, ServiceHeaders};
use super::access_log::RouteName;
use super::istio_stats::IstioDestination;
use super::local_reply::{caused, fault_abort_reply, local_reply, rate_limited_reply};
use super::request_body::{BodyFault, BodyFaults, BodyTee};
use super::routing::{header_matches, select_route, select_virtual_host, RequestView};
use super::upstream_request::{self, no_healthy_upstream, strip_retry_headers, Upstream};
use super::xfcc::forward_client_cert;
use crate::model::fallback::FallbackReason;
use crate::model::headers::HeaderMutation;
use crate::model::retry::RetryPolicy;
use crate::model::route::{Action, ClusterChoice, DirectResponseAction, ForwardAction, PathMatch, RedirectAction, Route, RouteConfig, VirtualHost};
use crate::model::tls::PeerIdentity;
use crate::model::{HttpFilter, HttpSettings, RouteSource, UpstreamProtocol};
use crate::policy::evaluate::RequestFacts;
use crate::policy::path::normalize_request_target;
use crate::registry::Registry;
use crate::telemetry::access_log::UpstreamInfo;
use crate::model::workload::Reporter;
use crate::telemetry::metrics::ListenerStats;
use crate::telemetry::peer_header::PEER_HEADER;
use crate::telemetry::resilience::ResponseFlag;
use crate::telemetry::trace_context::sampled_in;
use crate::upstream::destination_breaker::Admission;
use crate::upstream::fallback::ClusterFallback;
use crate::upstream::{ClusterRuntime, Endpoint};

/// What every request on one downstream connection shares.
pub struct HttpContext {
    pub settings: Arc<HttpSettings>,
    pub registry: Arc<Registry>,
    pub stats: Arc<ListenerStats>,
    /// "https" when the connection arrived over TLS.
    pub scheme: &'static str,
    pub peer: SocketAddr,
    /// Where a redirected connection was originally going (for ORIGINAL_DST clusters).
    pub original_destination: Option<SocketAddr>,
    /// The client's verified identity when it connected with mTLS; None for plaintext or TLS
    /// without a client certificate.
    pub peer_identity: Option<Arc<PeerIdentity>>,
    /// This server's own SPIFFE ID on a TLS connection (XFCC's `By=`).
    pub local_principal: Option<String>,
    /// The SNI of a TLS connection, for access logs.
    pub requested_server_name: Option<String>,
    /// The request counter of `peer_identity` (meshctl_downstream_requests_by_peer_total).
    pub peer_requests: Option<Arc<std::sync::atomic::AtomicU64>>,
    /// The port the client addressed (the original one for redirected connections), for RBAC.
    pub destination_port: u16,
    /// Request bodies this connection's client broke, as the upstream side saw them.
    pub body_faults: BodyFaults,
    /// Local rate limit buckets of this connection (configs with
    /// local_rate_limit_per_downstream_connection), made on first use; empty otherwise.
    pub rate_limiters: crate::policy::local_ratelimit::ConnectionLimiters,
    /// The caller as Istio's inbound metrics name it, resolved once per connection.
    pub istio_peer: super::istio_stats::PeerCache,
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) are never forwarded.
const HOP_BY_HOP: [HeaderName; 5] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

// `handle` and `route_request` return `async move` blocks rather than being `async fn`s, which
// would keep a second copy of the request in every request's future (see upstream_request.rs).
#[allow(clippy::manual_async_fn)] // on purpose: see the comment above `handle`
pub fn handle(context: Arc<HttpContext>, mut request: Request<Incoming>) -> impl Future<Output = Result<Response<ResponseBody>, Infallible>> {
    async move {
        // The mesh header is the sidecars' own: no app reads it, whatever listener this is.
        let peer_header = request.headers_mut().remove(PEER_HEADER);
        let mut istio = context.settings.istio.as_ref().map(|istio| super::istio_stats::begin(&context, istio, &mut request, peer_header));
        // Only a connection manager with access loggers gathers anything for them.
        let log_record = (!context.settings.access_log.is_empty()).then(|| super::access_log::begin(&context, &mut request));
        let span = context.settings.tracing.as_ref().and_then(|tracing| super::trace_span::begin(&context, tracing, &mut request));
        context.stats.requests_total.fetch_add(1, Relaxed);
        if let Some(peer_requests) = &context.peer_requests {
            peer_requests.fetch_add(1, Relaxed);
        }
        // After CONNECT the bytes that follow are tunnel payload, not HTTP. meshctl tunnels nothing,
        // so the connection cannot carry another request: it closes after the answer, as Envoy's does.
        let close_after = request.method() == Method::CONNECT && request.version() <= Version::HTTP_11;
        let mut response = route_request(&context, request, istio.as_deref_mut()).await;
        if close_after {
            response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        context.stats.responses.record(response.status().as_u16());
        // Before the access log, which takes the local reply's cause out of the extensions.
        if let (Some(begun), Some(istio)) = (istio, &context.settings.istio) {
            response = super::istio_stats::finish_at_body_end(&context, istio, &begun, response);
        }
        // Before the access log too: the span only reads the cause and upstream it takes.
        if let Some(span) = span {
            response = super::trace_span::finish_at_body_end(&context, span, response);
        }
        if let Some(record) = log_record {
            response = super::access_log::finish_at_body_end(&context, record, response);
        }
        Ok(response)
    }
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

#[allow(clippy::manual_async_fn)] // on purpose: see the comment above `handle`
/// `istio`: the request's Istio metrics record, told where the request went.
fn route_request<'a>(
    context: &'a Arc<HttpContext>,
    mut request: Request<Incoming>,
    istio: Option<&'a mut super::istio_stats::IstioRequest>,
) -> impl Future<Output = Response<ResponseBody>> + 'a {
    async move {
        // First, as Envoy's connection manager does: policy and routing see the rewritten header.
        forward_client_cert(&context.settings.forward_client_cert, context.peer_identity.as_deref(), context.local_principal.as_deref(), request.headers_mut());
        let grpc = is_grpc(request.headers());
        // A sampled span names itself after the route (its decorator); the unsampled skip that.
        let traced = context.settings.tracing.is_some() && sampled_in(request.headers());
        let route_config = match &context.settings.routes {
            RouteSource::Inline { config } => config.clone(),
            RouteSource::Rds { name } => match context.registry.route_config(name) {
                Some(config) => config,
                None => return no_route(context, grpc),
            },
        };
        let authority = match request_authority(&request) {
            Some(authority) => authority,
            None => return local_reply(StatusCode::BAD_REQUEST, "missing host header", grpc),
        };
        // A cheap clone (shared bytes): the request itself is rebuilt for the upstream below.
        let path_and_query = request.uri().path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
        // Normalized once, here: RBAC, routing and the upstream all see this same path.
        let path_and_query = match normalize_request_target(&context.settings.path_normalization, path_and_query) {
            Ok(normalized) => normalized,
            Err(rejection) => return local_reply(StatusCode::BAD_REQUEST, rejection.message(), grpc),
        };
        let view = RequestView {
            method: request.method(),
            path_and_query: path_and_query.as_str(),
            authority: &authority,
            scheme: context.scheme,
            headers: request.headers(),
        };
        let principal = context.peer_identity.as_deref().map(|identity| identity.principal.as_str());
        let facts = RequestFacts { request: &view, destination_port: context.destination_port, principal };
        if context.settings.rbac.check(&facts).is_err() {
            return caused(local_reply(StatusCode::FORBIDDEN, "RBAC: access denied", grpc), None, "rbac_access_denied_matched_policy[none]");
        }
        let Some(vhost) = select_virtual_host(&route_config, &authority) else {
            return no_route(context, grpc);
        };
        let Some(route) = select_route(vhost, &view) else {
            return no_route(context, grpc);
        };
        route.stats.requests_total.fetch_add(1, Relaxed);
        // The rate limit, adaptive concurrency and fault filters, before the router, in
        // http_filters' order; for each, the most specific per-route config (found by the filter's
        // name) replaces the filter's (adaptive concurrency has none). Local limits decide
        // synchronously; each adds nothing to this future but a reference.
        // Headers a rate limit service asked to add to the response (rarely any).
        let mut service_response_headers: Option<Box<ServiceHeaders>> = None;
        // The adaptive concurrency filter's admission: completed with the response head (the
        // request's latency is a sample); dropped with this future when the client goes away.
        let mut admitted = None;
        for filter in &context.settings.filters {
            match filter {
                HttpFilter::AdaptiveConcurrency { config } => {
                    if !config.enabled {
                        continue;
                    }
                    match config.controller.admit(Instant::now()) {
                        Some(admission) => admitted = Some(admission),
                        // Envoy answers a shed request with no response flag, only the details
                        // "reached_concurrency_limit"; its count is rq_blocked.
                        None => return local_reply(config.limit_exceeded_status, "reached concurrency limit", grpc),
                    }
                }
                HttpFilter::GlobalRateLimit { config, .. } => {
                    let Some((descriptors, stats)) = global_rate_limit_needed(context, config, vhost, route, &request, &authority, path_and_query.as_str()) else {
                        continue;
                    };
                    // Boxed: the call's future exists only for requests that have descriptors.
                    match Box::pin(global_ratelimit::decide(context, config, descriptors, &stats, grpc)).await {
                        Decision::Allow(None) => {}
                        Decision::Allow(Some(headers)) => {
                            ServiceHeaders::append_to(&headers.request, request.headers_mut());
                            match &mut service_response_headers {
                                Some(earlier) => earlier.response.extend(headers.response),
                                None => service_response_headers = Some(headers),
                            }
                        }
                        Decision::Reply(reply) => return *reply,
                    }
                }
                HttpFilter::LocalRateLimit { name, config } => {
                    let config = route.local_rate_limit(name).unwrap_or(config);
                    match local_rate_limit(context, config, vhost, route, &request, &authority, path_and_query.as_str(), grpc) {
                        Ok(true) => config.request_headers_when_not_enforced.apply(request.headers_mut()),
                        Ok(false) => {}
                        Err(reply) => return *reply,
                    }
                }
                HttpFilter::Fault => {
                    let Some(filter_fault) = &context.settings.fault else { continue };
                    let policy = route.fault.as_deref().unwrap_or(filter_fault);
                    if !policy.is_empty() {
                        // Boxed: a delay's timer would otherwise sit in every request's future.
                        if let Some(abort) = Box::pin(crate::policy::fault::inject(policy, &context.stats)).await {
                            return caused(fault_abort_reply(abort, grpc), Some(ResponseFlag::FaultInjected), "fault_filter_abort");
                        }
                    }
                }
            }
        }
        let started = Instant::now();
        let mut cluster_response_mutation = None;
        let mut response = match &route.action {
            Action::DirectResponse(direct) => direct_response(direct),
            Action::Redirect(redirect) => redirect_response(redirect, route, context.scheme, &authority, path_and_query.as_str(), request.headers()),
            Action::Forward(forward) => {
                let targets = Targets { route_config: &route_config, vhost, route, grpc };
                let (prepared, cluster_mutation) = prepare_forward(context, forward, &targets, request, authority, path_and_query);
                cluster_response_mutation = cluster_mutation;
                match prepared {
                    Ok(outbound) => {
                        // Where it went, for a source reporter's destination_* labels.
                        if let Some(record) = istio {
                            let cluster = outbound.diverted.as_ref().map_or(&outbound.primary, |(to, _)| to);
                            record.destination = Some(IstioDestination {
                                workload: outbound.endpoint.workload.clone(),
                                service: cluster.config.service.clone(),
                            });
                        }
                        forward_request(context, forward, vhost, grpc, outbound).await
                    }
                    Err(reply) => reply,
                }
            }
        };
        route.stats.latency.record(started.elapsed());
        if let Some(admission) = admitted {
            admission.complete(Instant::now());
        }
        // Like Envoy, response mutations apply to local replies (timeouts, 503s) as well.
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            let mutations = std::iter::once(&route.response_headers)
                .chain(cluster_response_mutation)
                .chain([&vhost.response_headers, &route_config.response_headers]);
            for mutation in mutations {
                mutation.apply(response.headers_mut());
            }
        }
        if let Some(headers) = service_response_headers {
            ServiceHeaders::append_to(&headers.response, response.headers_mut());
        }
        if !context.settings.access_log.is_empty() {
            response.extensions_mut().insert(RouteName(route.name.clone()));
        }
        if let (true, Some(operation)) = (traced, &route.decorator) {
            response.extensions_mut().insert(super::trace_span::SpanOperation(operation.clone()));
        }
        response
    }
}

/// One local rate limit filter instance for one request, with `config` (the filter's own or
/// the route's for it): Err(the local reply) when it is limited and enforced; Ok(true) when
/// limited in shadow mode (its not-enforced request headers are to be added); Ok(false) otherwise.
#[allow(clippy::too_many_arguments)]
fn local_rate_limit(
    context: &HttpContext,
    config: &crate::model::local_ratelimit::LocalRateLimit,
    vhost: &VirtualHost,
    route: &Route,
    request: &Request<Incoming>,
    authority: &str,
    path_and_query: &str,
    grpc: bool,
) -> Result<bool, Box<Response<ResponseBody>>> {
    use crate::policy::local_ratelimit::{decide, RequestDescriptorSource, Verdict};
    let view = RequestView { method: request.method(), path_and_query, authority, scheme: context.scheme, headers: request.headers() };
    let client_ip = || client_address(context, request.headers());
    let source = RequestDescriptorSource { route, vhost, request: &view, client_ip: &client_ip };
    match decide(config, &source, &context.rate_limiters) {
        Verdict::Pass => Ok(false),
        Verdict::Shadow => Ok(true),
        Verdict::Limit => {
            context.stats.response_flags.record(ResponseFlag::RateLimited);
            // Boxed: the cold path's reply stays out of the common result.
            Err(Box::new(caused(rate_limited_reply(config, grpc), Some(ResponseFlag::RateLimited), "local_rate_limited")))
        }
    }
}

/// Whether the global rate limit filter asks its service about this request: its descriptors
/// (none: no call) and the counters of the route's target cluster. Like Envoy's filter, it skips
/// routes without a cluster (direct responses, redirects) and clusters not configured. A weighted
/// route counts under its first cluster (meshctl picks among them after the filters run).
#[allow(clippy::too_many_arguments)]
fn global_rate_limit_needed(
    context: &HttpContext,
    config: &crate::model::global_ratelimit::GlobalRateLimit,
    vhost: &VirtualHost,
    route: &Route,
    request: &Request<Incoming>,
    authority: &str,
    path_and_query: &str,
) -> Option<(Vec<crate::policy::local_ratelimit::Descriptor>, Arc<crate::telemetry::metrics::ClusterStats>)> {
    use crate::policy::local_ratelimit::RequestDescriptorSource;
    // The cheap test first: a route and virtual host without policies cost nothing more.
    if route.rate_limits.is_empty() && vhost.rate_limits.is_empty() {
        return None;
    }
    let Action::Forward(forward) = &route.action else { return None };
    let target = match &forward.clusters {
        ClusterChoice::Single { name } => name.as_str(),
        ClusterChoice::Weighted(weighted) => weighted.clusters.first()?.name.as_str(),
    };
    let cluster = context.registry.cluster(target)?;
    let view = RequestView { method: request.method(), path_and_query, authority, scheme: context.scheme, headers: request.headers() };
    let client_ip = || client_address(context, request.headers());
    let source = RequestDescriptorSource { route, vhost, request: &view, client_ip: &client_ip };
    let descriptors = global_ratelimit::descriptors(config, &source);
    if descriptors.is_empty() {
        return None;
    }
    Some((descriptors, cluster.stats.clone()))
}

/// The client's address as the rate limit actions see it (remote_address): from x-forwarded-for
/// when the connection manager is set to trust it, else the connection's peer.
fn client_address(context: &HttpContext, headers: &HeaderMap) -> std::net::IpAddr {
    context
        .settings
        .client_address_from_xff
        .and_then(|hops| address_from_xff(headers, hops))
        .unwrap_or_else(|| context.peer.ip())
}

/// Envoy's client address when it does not use the connection's: the x-forwarded-for entry
/// `hops` from the end (the last one with no trusted hops); None when there are too few.
fn address_from_xff(headers: &HeaderMap, hops: u32) -> Option<std::net::IpAddr> {
    let joined: Vec<&str> = headers.get_all("x-forwarded-for").iter().filter_map(|v| v.to_str().ok()).collect();
    let entry = joined.iter().flat_map(|v| v.split(',')).rev().nth(hops as usize)?;
    entry.trim().parse().ok()
}

/// 404, flag NR.
fn no_route(context: &HttpContext, grpc: bool) -> Response<ResponseBody> {
    context.stats.response_flags.record(ResponseFlag::NoRouteFound);
    caused(local_reply(StatusCode::NOT_FOUND, "", grpc), Some(ResponseFlag::NoRouteFound), "route_not_found")
}

fn request_authority(request: &Request<Incoming>) -> Option<String> {
    if let Some(authority) = request.uri().authority() {
        return Some(authority.as_str().to_string());
    }
    request.headers().get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_string)
}

fn direct_response(direct: &DirectResponseAction) -> Response<ResponseBody> {
    let mut response = Response::new(match &direct.body {
        Some(body) => ResponseBody::text(body.clone()),
        None => ResponseBody::empty(),
    });
    *response.status_mut() = direct.status;
    if direct.body.is_some() {
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    response
}

fn redirect_response(
    redirect: &RedirectAction,
    route: &Route,
    scheme: &str,
    authority: &str,
    path_and_query: &str,
    headers: &HeaderMap,
) -> Response<ResponseBody> {
    let original_scheme = headers.get("x-forwarded-proto").and_then(|v| v.to_str().ok()).unwrap_or(scheme);
    let final_scheme = redirect.scheme.as_deref().unwrap_or(original_scheme);
    let (mut host, mut port) = split_host_port(authority);
    if let Some(new_host) = &redirect.host {
        let (h, p) = split_host_port(new_host);
        host = h;
        if p.is_some() {
            port = p;
        }
    }
    let default_port = |scheme: &str| match scheme {
        "http" => Some("80"),
        "https" => Some("443"),
        _ => None,
    };
    let port = match redirect.port {
        Some(p) => Some(p.to_string()),
        // On a scheme change the old scheme's default port is dropped; any other port is kept.
        None if final_scheme != original_scheme && port.is_some() && port == default_port(original_scheme) => None,
        None => port.map(str::to_string),
    };
    let (path, query) = path_and_query.split_once('?').map_or((path_and_query, None), |(p, q)| (p, Some(q)));
    let (new_path, new_query) = match (&redirect.path, &redirect.prefix_rewrite) {
        (Some(p), _) => match p.split_once('?') {
            Some((p, q)) => (p.to_string(), Some(q.to_string())),
            None => (p.clone(), query.map(str::to_string)),
        },
        (None, Some(prefix)) => (rewrite_prefix(&route.matcher.path, path, prefix), query.map(str::to_string)),
        (None, None) => (path.to_string(), query.map(str::to_string)),
    };
    let new_query = if redirect.strip_query { None } else { new_query.filter(|q| !q.is_empty()) };
    let mut location = format!("{final_scheme}://{host}");
    if let Some(port) = port {
        location.push(':');
        location.push_str(&port);
    }
    location.push_str(&new_path);
    if let Some(q) = new_query {
        location.push('?');
        location.push_str(&q);
    }
    let mut response = Response::new(ResponseBody::empty());
    *response.status_mut() = redirect.status;
    match HeaderValue::from_str(&location) {
        Ok(value) => {
            response.headers_mut().insert(header::LOCATION, value);
            response
        }
        Err(_) => local_reply(StatusCode::INTERNAL_SERVER_ERROR, "redirect location is not a valid header", false),
    }
}

fn split_host_port(authority: &str) -> (&str, Option<&str>) {
    match authority.rsplit_once(':') {
        Some((host, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) && (!host.contains(':') || host.ends_with(']')) => {
            (host, Some(port))
        }
        _ => (authority, None),
    }
}

/// Replace the part of `path` the route matched with `replacement` (Envoy's prefix_rewrite).
fn rewrite_prefix(matcher: &PathMatch, path: &str, replacement: &str) -> String {
    let matched_len = match matcher {
        PathMatch::Prefix(p) | PathMatch::PathSeparatedPrefix(p) => p.len().min(path.len()),
        PathMatch::Exact(_) | PathMatch::Regex(_) => path.len(),
    };
    format!("{replacement}{}", &path[matched_len..])
}

struct Targets<'a> {
    route_config: &'a RouteConfig,
    vhost: &'a VirtualHost,
    route: &'a Route,
    grpc: bool,
}

/// A request made ready for its cluster (`prepare_forward`), with what handling its answer needs.
struct Outbound<'a> {
    request: Request<Incoming>,
    endpoint: Arc<Endpoint>,
    /// The route's cluster, whose Fallback (if any) judges the answer.
    primary: Arc<ClusterRuntime>,
    /// Where the request goes instead when a Fallback diverted it before sending, and why.
    diverted: Option<(Arc<ClusterRuntime>, FallbackReason)>,
    /// The Fallback breaker's admission of this call, when the route's cluster has a breaker.
    admission: Option<Admission>,
    /// A copy of the head for a `destination` Fallback's second send (boxed: rarely made).
    resend: Option<Box<http::request::Parts>>,
    mirror_body: Option<Box<BodyTee>>,
    retry_policy: Option<&'a RetryPolicy>,
    timeout: Option<Duration>,
    host: String,
    downstream_upgrade: Option<hyper::upgrade::OnUpgrade>,
    head: bool,
    downstream_http1: bool,
}

/// Choose the route's (or weighted) cluster and an endpoint, and rewrite the request for it; or
/// the local reply that answers it instead. Also returns the chosen weighted cluster's response
/// mutation. Synchronous, so that none of its working state is part of the request's future.
#[allow(clippy::result_large_err)] // made once per request and consumed at once
fn prepare_forward<'a>(
    context: &Arc<HttpContext>,
    forward: &'a ForwardAction,
    targets: &Targets<'a>,
    mut request: Request<Incoming>,
    authority: String,
    path_and_query: PathAndQuery,
) -> (Result<Outbound<'a>, Response<ResponseBody>>, Option<&'a HeaderMutation>) {
    let Targets { route_config, vhost, route, grpc } = *targets;
    let (cluster_name, request_mutation, response_mutation) = match &forward.clusters {
        ClusterChoice::Single { name } => (name.as_str(), None, None),
        ClusterChoice::Weighted(weighted) => {
            let chosen = weighted.pick(fastrand::u64(..weighted.total()));
            (chosen.name.as_str(), Some(&chosen.request_headers), Some(&chosen.response_headers))
        }
    };
    let Some(primary) = context.registry.cluster(cluster_name) else {
        context.stats.response_flags.record(ResponseFlag::NoClusterFound);
        let reply = local_reply(StatusCode::SERVICE_UNAVAILABLE, &format!("cluster {cluster_name:?} is not configured"), grpc);
        return (Err(caused(reply, Some(ResponseFlag::NoClusterFound), "cluster_not_found")), response_mutation);
    };
    let (target, endpoint, diverted, admission) = match choose_endpoint(context, &primary, grpc) {
        Ok(chosen) => chosen,
        Err(answer) => return (Err(answer), response_mutation),
    };
    let reply = |status, message: &str| (Err(local_reply(status, message, grpc)), response_mutation);
    // A policy that retries nothing needs no retry state, as in Envoy; retriable_request_headers
    // are matched against the request as it arrived.
    let retry_policy = forward.retry_policy.as_deref().filter(|policy| !policy.retry_on.is_empty()).filter(|policy| {
        policy.retriable_request_headers.is_empty() || {
            let view = RequestView {
                method: request.method(),
                path_and_query: path_and_query.as_str(),
                authority: &authority,
                scheme: context.scheme,
                headers: request.headers(),
            };
            policy.retriable_request_headers.iter().any(|matcher| header_matches(matcher, &view))
        }
    });

    let upgrade = requested_upgrade(request.headers())
        .filter(|u| context.settings.upgrades.contains(u) || forward.upgrades.contains(u));
    if upgrade.is_none() && request.headers().contains_key(header::UPGRADE) && request.version() == Version::HTTP_11 {
        if let Some(kind) = requested_upgrade(request.headers()) {
            return reply(StatusCode::FORBIDDEN, &format!("upgrade to {kind:?} is not allowed on this route"));
        }
    }
    let downstream_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut request));

    // Build the upstream request in place: new URI, host, hop-by-hop headers, mutations.
    let path = match &forward.prefix_rewrite {
        Some(replacement) => {
            let mut rewritten = rewrite_prefix(&route.matcher.path, path_and_query.path(), replacement);
            if let Some(q) = path_and_query.query() {
                rewritten.push('?');
                rewritten.push_str(q);
            }
            match PathAndQuery::try_from(rewritten) {
                Ok(path) => path,
                Err(_) => return reply(StatusCode::BAD_REQUEST, "invalid rewritten path"),
            }
        }
        None => path_and_query,
    };
    let host = forward.host_rewrite.clone().unwrap_or(authority);
    let headers = request.headers_mut();
    let te_trailers = headers.get(header::TE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    strip_hop_by_hop(headers);
    headers.remove(header::TE);
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if let Some(kind) = &upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        if let Ok(value) = HeaderValue::from_str(kind) {
            headers.insert(header::UPGRADE, value);
        }
    }
    strip_retry_headers(headers);
    // Who this sidecar is, for the callee's inbound metrics: only to another sidecar over mesh
    // mTLS, whose certificate the callee checks the header's principal against
    // (telemetry/peer_header); never to a service outside the mesh over plain TLS origination.
    if let Some(istio) = context.settings.istio.as_deref().filter(|istio| istio.reporter == Reporter::Source) {
        if target.config.tls.as_ref().is_some_and(|tls| tls.is_mesh_mtls()) {
            headers.insert(PEER_HEADER, istio.peer_header.clone());
        }
    }
    headers.insert(HeaderName::from_static("x-forwarded-proto"), HeaderValue::from_static(context.scheme));
    // A HeaderName, not a &str: a lookup by &str parses the name on every request.
    const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
    if !headers.contains_key(REQUEST_ID) {
        headers.insert(REQUEST_ID, request_id());
    }
    // Most specific first, as Envoy applies them: route, weighted cluster, virtual host, table.
    let mutations = std::iter::once(&route.request_headers)
        .chain(request_mutation)
        .chain([&vhost.request_headers, &route_config.request_headers]);
    for mutation in mutations {
        mutation.apply(headers);
    }
    let downstream_http1 = request.version() <= Version::HTTP_11;
    let head = request.method() == Method::HEAD;
    let (mut upstream_head, body) = request.into_parts();
    if let Err(problem) = address_head(&mut upstream_head, &target, &host, path) {
        return reply(StatusCode::BAD_REQUEST, problem);
    }
    // A `destination` fallback after a failure sends the request again: only one without a body
    // (kept here), since the body has been streamed to the cluster that failed.
    let resend = match (&diverted, &primary.fallback) {
        (None, Some(guard)) if fallback::target_cluster(guard).is_some() && http_body::Body::is_end_stream(&body) => {
            Some(Box::new(upstream_head.clone()))
        }
        _ => None,
    };
    let request = Request::from_parts(upstream_head, body);
    // An upgrade becomes a tunnel to one upstream; a copy of it has nothing to mirror into.
    let mirror_body = if !forward.mirrors.is_empty() && upgrade.is_none() {
        super::mirror::mirror(context, &forward.mirrors, &request, &host, forward.timeout, forward.retry_buffer_limit)
    } else {
        None
    };
    let timeout = effective_timeout(forward.timeout, request.headers());
    let outbound = Outbound {
        request,
        endpoint,
        primary,
        diverted: diverted.map(|reason| (target, reason)),
        admission,
        resend,
        mirror_body,
        retry_policy,
        timeout,
        host,
        downstream_upgrade,
        head,
        downstream_http1,
    };
    (Ok(outbound), response_mutation)
}

/// The cluster and endpoint a request goes to: the route's cluster, or its Fallback's when the
/// Fallback's breaker is open or the cluster has no endpoint (then with the reason it diverted);
/// and the breaker's admission. Err: the answer instead (a fixed fallback response, or 503).
#[allow(clippy::type_complexity, clippy::result_large_err)]
fn choose_endpoint(
    context: &HttpContext,
    primary: &Arc<ClusterRuntime>,
    grpc: bool,
) -> Result<(Arc<ClusterRuntime>, Arc<Endpoint>, Option<FallbackReason>, Option<Admission>), Response<ResponseBody>> {
    // meshctl's Fallback: an open breaker, or a cluster with no endpoint, is answered by the
    // fallback at once; a `destination` fallback then takes the request as the route would.
    let Some(guard) = &primary.fallback else {
        return match primary.pick_endpoint(context.original_destination) {
            Some(endpoint) => Ok((primary.clone(), endpoint, None, None)),
            None => Err(no_healthy_upstream(primary, grpc)),
        };
    };
    let (target, diverted, admission) = match guard.admit() {
        Some(Admission::Rejected) => (divert(context, guard, FallbackReason::BreakerOpen, grpc)?, Some(FallbackReason::BreakerOpen), None),
        admission => (primary.clone(), None, admission),
    };
    if let Some(endpoint) = target.pick_endpoint(context.original_destination) {
        return Ok((target, endpoint, diverted, admission));
    }
    // Nothing to send to: the breaker hears of a failure.
    if let Some(admission) = admission {
        BreakerCall::new(guard, admission).record(true);
    }
    if diverted.is_none() && guard.applies_on(FallbackReason::NoHealthyUpstream) {
        let to = divert(context, guard, FallbackReason::NoHealthyUpstream, grpc)?;
        return match to.pick_endpoint(context.original_destination) {
            Some(endpoint) => Ok((to, endpoint, Some(FallbackReason::NoHealthyUpstream), None)),
            None => {
                let mut answer = no_healthy_upstream(&to, grpc);
                fallback::mark(&mut answer, FallbackReason::NoHealthyUpstream);
                Err(answer)
            }
        };
    }
    let mut answer = no_healthy_upstream(&target, grpc);
    if let Some(reason) = diverted {
        fallback::mark(&mut answer, reason);
    }
    Err(answer)
}

/// Send a prepared request and turn its answer into the response: a Fallback's when the route's
/// cluster failed, an upgrade's tunnel, or the upstream's. A plain function returning an `async
/// move` block, so that `outbound` is kept once in the request's future (an `async fn` would
/// keep it twice).
#[allow(clippy::manual_async_fn)] // on purpose: see the comment above `handle`
fn forward_request<'a>(
    context: &'a Arc<HttpContext>,
    forward: &'a ForwardAction,
    vhost: &'a VirtualHost,
    grpc: bool,
    mut outbound: Outbound<'a>,
) -> impl Future<Output = Response<ResponseBody>> + 'a {
    async move {
        let cluster = outbound.diverted.as_ref().map_or(&outbound.primary, |(to, _)| to);
        let upstream = Upstream {
            context,
            cluster,
            retry_policy: outbound.retry_policy,
            retry_buffer_limit: forward.retry_buffer_limit,
            timeout: outbound.timeout,
            grpc,
            downstream_http1: outbound.downstream_http1,
            attempt_count_header: vhost.include_request_attempt_count,
            mirror_body: outbound.mirror_body.take(),
        };
        // The first try's endpoint (a retry may go elsewhere), for access logs only; boxed, so
        // that it adds a pointer, not the record, to every request's future.
        let traced = context.settings.tracing.is_some() && sampled_in(outbound.request.headers());
        let logged_upstream = (!context.settings.access_log.is_empty() || traced)
            .then(|| Box::new(UpstreamInfo { cluster: cluster.config.name.clone(), host: outbound.endpoint.address }));
        let breaker_call = match (&outbound.primary.fallback, outbound.admission) {
            (Some(guard), Some(admission)) => Some(BreakerCall::new(guard, admission)),
            _ => None,
        };
        let mut answer = upstream_request::send(upstream, outbound.endpoint, outbound.request).await;
        let mut fell_back = outbound.diverted.as_ref().map(|(_, reason)| *reason);
        if let (None, Some(guard)) = (&outbound.diverted, &outbound.primary.fallback) {
            let failure = fallback::failure_reason(&answer);
            if let Some(call) = breaker_call {
                call.record(failure.is_some());
            }
            if let Some(reason) = failure.filter(|reason| guard.applies_on(*reason)) {
                if let Some(answer) = fallback::fixed_response(guard, reason) {
                    return answer;
                }
                let to = fallback::target_cluster(guard).and_then(|name| context.registry.cluster(name));
                if let (Some(copy), Some(to)) = (outbound.resend.take(), to) {
                    guard.count(reason);
                    fell_back = Some(reason);
                    let upstream = Upstream {
                        context,
                        cluster: &to,
                        retry_policy: outbound.retry_policy,
                        retry_buffer_limit: forward.retry_buffer_limit,
                        timeout: outbound.timeout,
                        grpc,
                        downstream_http1: outbound.downstream_http1,
                        attempt_count_header: vhost.include_request_attempt_count,
                        mirror_body: None, // the first send mirrored it
                    };
                    // Boxed: a second send inline would grow every request's future.
                    answer = Box::pin(fallback::send_again(upstream, *copy, &outbound.host)).await;
                }
            }
        }
        let with_attempts = |mut response: Response<ResponseBody>| {
            if vhost.include_attempt_count_in_response {
                response.headers_mut().insert(HeaderName::from_static("x-envoy-attempt-count"), HeaderValue::from(answer.tries));
            }
            if let Some(reason) = fell_back {
                fallback::mark(&mut response, reason);
            }
            if let Some(upstream) = logged_upstream {
                response.extensions_mut().insert(*upstream);
            }
            response
        };
        let (mut response, lease) = match answer.result {
            Ok(exchange) => exchange,
            Err(local) => return with_attempts(local),
        };

        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(downstream_upgrade) = outbound.downstream_upgrade {
                // The upstream connection becomes the tunnel: it never returns to the pool, and the
                // tunnel counts as the cluster's active request while it lasts.
                let upstream_upgrade = hyper::upgrade::on(&mut response);
                tokio::spawn(tunnel(downstream_upgrade, upstream_upgrade, lease));
                let (parts, _) = response.into_parts();
                return with_attempts(Response::from_parts(parts, ResponseBody::empty()));
            }
        }
        strip_hop_by_hop(response.headers_mut());
        let (parts, body) = response.into_parts();
        // A HEAD response has no content (RFC 9110 §9.3.2). An HTTP/2 upstream that sends some anyway
        // has its stream reset by h2; passing that body on would reset the client's stream too, often
        // before the response head it is owed has gone out.
        let body = if outbound.head && !http_body::Body::is_end_stream(&body) { ResponseBody::empty() } else { ResponseBody::Upstream(body, lease) };
        with_attempts(Response::from_parts(parts, body))
    }
}

/// Point a request head at `cluster`: the URI form, Host header and version its protocol takes.
pub(super) fn address_head(head: &mut http::request::Parts, cluster: &ClusterRuntime, host: &str, path: PathAndQuery) -> Result<(), &'static str> {
    let http2 = cluster.config.protocol == UpstreamProtocol::Http2;
    head.uri = upstream_uri(host, path, http2, cluster.config.tls.is_some()).ok_or("invalid request target")?;
    if http2 {
        head.headers.remove(header::HOST);
        head.version = Version::HTTP_2;
    } else {
        head.headers.insert(header::HOST, HeaderValue::from_str(host).map_err(|_| "invalid host")?);
        head.version = Version::HTTP_11;
    }
    Ok(())
}

/// Where a Fallback diverts a request: its fallback cluster, or the answer to give instead (the
/// fixed response, or 503 when the fallback cluster is not configured).
fn divert(context: &HttpContext, guard: &ClusterFallback, reason: FallbackReason, grpc: bool) -> Result<Arc<ClusterRuntime>, Response<ResponseBody>> {
    if let Some(answer) = fallback::fixed_response(guard, reason) {
        return Err(answer);
    }
    let name = fallback::target_cluster(guard).unwrap_or_default();
    guard.count(reason);
    context.registry.cluster(name).ok_or_else(|| {
        context.stats.response_flags.record(ResponseFlag::NoClusterFound);
        let reply = local_reply(StatusCode::SERVICE_UNAVAILABLE, &format!("fallback cluster {name:?} is not configured"), grpc);
        let mut answer = caused(reply, Some(ResponseFlag::NoClusterFound), "cluster_not_found");
        fallback::mark(&mut answer, reason);
        answer
    })
}

/// The answer to a request whose body the client broke: 400, and on HTTP/1.1 the connection
/// closes (its framing is lost), as Envoy answers a codec error.
pub(super) fn body_fault_reply(fault: BodyFault, grpc: bool, http1: bool) -> Response<ResponseBody> {
    let message = match fault {
        BodyFault::Malformed => "malformed request body (invalid chunked encoding)",
        BodyFault::Aborted => "incomplete request body (the client stopped sending it)",
    };
    let mut response = local_reply(StatusCode::BAD_REQUEST, message, grpc);
    if http1 {
        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers named in Connection are hop-by-hop too. Its values are taken out of the map first,
    // so that the names they list are removed by &str, which allocates nothing (a HeaderName of
    // a name outside the standard set, such as keep-alive, would: once per response). One value
    // is the common case; several are copied out (HeaderValue clones share their bytes).
    match headers.get_all(header::CONNECTION).iter().count() {
        0 => {}
        1 => {
            if let Some(value) = headers.remove(header::CONNECTION) {
                remove_listed(headers, &value);
            }
        }
        _ => {
            let values: Vec<HeaderValue> = headers.get_all(header::CONNECTION).iter().cloned().collect();
            headers.remove(header::CONNECTION);
            for value in &values {
                remove_listed(headers, value);
            }
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Removes the headers a Connection value lists (comma-separated names, any case).
fn remove_listed(headers: &mut HeaderMap, connection: &HeaderValue) {
    let Ok(names) = connection.to_str() else { return };
    for name in names.split(',').map(str::trim).filter(|name| !name.is_empty()) {
        headers.remove(name);
    }
}

/// The upgrade protocol an HTTP/1.1 request asks for (`Connection: upgrade` + `Upgrade: x`).
fn requested_upgrade(headers: &HeaderMap) -> Option<String> {
    let connection_upgrade = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")));
    if !connection_upgrade {
        return None;
    }
    headers.get(header::UPGRADE)?.to_str().ok().map(|u| u.trim().to_ascii_lowercase())
}

/// `tls`: the upstream connection is TLS, so an HTTP/2 request's :scheme is https.
pub(crate) fn upstream_uri(host: &str, path_and_query: PathAndQuery, absolute: bool, tls: bool) -> Option<Uri> {
    if absolute {
        Uri::builder()
            .scheme(if tls { Scheme::HTTPS } else { Scheme::HTTP })
            .authority(Authority::try_from(host).ok()?)
            .path_and_query(path_and_query)
            .build()
            .ok()
    } else {
        Some(Uri::from(path_and_query))
    }
}

/// The route's timeout, shortened by the client's gRPC deadline (grpc-timeout) when that is sooner.
fn effective_timeout(route_timeout: Option<Duration>, headers: &HeaderMap) -> Option<Duration> {
    let grpc_deadline = headers.get("grpc-timeout").and_then(|v| parse_grpc_timeout(v.as_bytes()));
    match (route_timeout, grpc_deadline) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// gRPC's `TimeoutValue TimeoutUnit`: up to 8 digits and one of H M S m u n.
fn parse_grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let amount: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit[0] {
        b'H' => Duration::from_secs(amount * 3600),
        b'M' => Duration::from_secs(amount * 60),
        b'S' => Duration::from_secs(amount),
        b'm' => Duration::from_millis(amount),
        b'u' => Duration::from_micros(amount),
        b'n' => Duration::from_nanos(amount),
        _ => return None,
    })
}

pub(super) fn request_id() -> HeaderValue {
    use std::io::Write;
    let id = fastrand::u128(..);
    // A version-4 UUID, formatted on the stack: one allocation (the header value) per request,
    // shared by reference count, so the copy of the head a retry policy keeps allocates no other.
    let mut text = [0u8; 36];
    let _ = write!(
        &mut text[..],
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        (id >> 96) as u32,
        (id >> 80) as u16,
        (id >> 68) as u16 & 0x0fff,
        ((id >> 52) as u16 & 0x3fff) | 0x8000,
        id as u64 & 0xffff_ffff_ffff
    );
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(text)).expect("hex digits and dashes are a valid header value")
}

async fn tunnel(
    downstream: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    _lease: Option<crate::upstream::pool::ConnectionLease>,
) {
    let (Ok(downstream), Ok(upstream)) = tokio::join!(downstream, upstream) else { return };
    let mut downstream = TokioIo::new(downstream);
    let mut upstream = TokioIo::new(upstream);
    let _ = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(parse_grpc_timeout(b"100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout(b"2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout(b"123456789S"), None);
        assert_eq!(parse_grpc_timeout(b"m"), None);
        assert_eq!(parse_grpc_timeout(b"10x"), None);
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_removed() {
        let mut headers = HeaderMap::new();
        headers.append(header::CONNECTION, HeaderValue::from_static("keep-alive, X-Drop-Me ,"));
        headers.append(header::CONNECTION, HeaderValue::from_static("x-also, bad name"));
        for name in ["keep-alive", "x-drop-me", "x-also", "x-kept", "transfer-encoding", "upgrade"] {
            headers.insert(HeaderName::from_static(name), HeaderValue::from_static("1"));
        }
        strip_hop_by_hop(&mut headers);
        let left: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["x-kept"]);

        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.keys().map(HeaderName::as_str).collect::<Vec<_>>(), ["content-type"]);
    }

    #[test]
    fn prefix_rewrite_replaces_only_the_matched_prefix() {
        assert_eq!(rewrite_prefix(&PathMatch::Prefix("/api/".into()), "/api/v1/x", "/"), "/v1/x");
        assert_eq!(rewrite_prefix(&PathMatch::Exact("/old".into()), "/old", "/new"), "/new");
    }
}
