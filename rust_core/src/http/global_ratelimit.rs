//! Envoy's HTTP global rate limit filter on the request path: the request's descriptors, then a
//! locally granted quota (meshctl's extension) or a ShouldRateLimit call to the rate limit
//! service, and the allow / limit / fail-open decision with Envoy's counters and replies.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use envoy_types::pb::envoy::config::core::v3::HeaderValue as ProtoHeader;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::{rate_limit_descriptor::Entry, RateLimitDescriptor};
use envoy_types::pb::envoy::service::ratelimit::v3::{rate_limit_response, RateLimitRequest, RateLimitResponse};
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::{HeaderMap, Response};
use prost::Message;

use super::body::ResponseBody;
use super::grpc_unary::{self, frame};
use super::local_reply::{caused, local_reply};
use super::proxy::HttpContext;
use crate::model::global_ratelimit::{GlobalRateLimit, RequestType};
use crate::model::local_ratelimit::VhRateLimits;
use crate::policy::local_ratelimit::{route_descriptors, Descriptor, RequestDescriptorSource};
use crate::policy::quota::{AskOutcome, Local};
use crate::telemetry::metrics::ClusterStats;
use crate::telemetry::resilience::{ResilienceStats, ResponseFlag};

const SHOULD_RATE_LIMIT: &str = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";
/// The request metadata that tells a meshctl rate limit service it may grant quota.
pub const QUOTA_METADATA: &str = "x-meshctl-quota";

/// Headers the service asked for: added to the upstream request and to the response.
#[derive(Debug, Default)]
pub struct ServiceHeaders {
    pub request: Vec<(HeaderName, HeaderValue)>,
    pub response: Vec<(HeaderName, HeaderValue)>,
}

impl ServiceHeaders {
    /// Appended, as Envoy adds them (a header already there keeps its value too).
    pub fn append_to(headers: &[(HeaderName, HeaderValue)], map: &mut HeaderMap) {
        for (name, value) in headers {
            map.append(name.clone(), value.clone());
        }
    }
}

pub enum Decision {
    /// Goes on; with the headers the service returned, if any (boxed: rare).
    Allow(Option<Box<ServiceHeaders>>),
    /// Answered here: over the limit (RL), or the service failed and failure_mode_deny (RLSE).
    Reply(Box<Response<ResponseBody>>),
}

/// The descriptors this filter sends for the request; none (and no allocation) when its route
/// and virtual host have no policies of the filter's stage, or its request_type excludes it.
pub fn descriptors(config: &GlobalRateLimit, source: &RequestDescriptorSource<'_>) -> Vec<Descriptor> {
    if source.route.rate_limits.is_empty() && source.vhost.rate_limits.is_empty() {
        return Vec::new();
    }
    // Envoy 1.40 marks a request internal only for addresses in internal_address_config (which
    // meshctl refuses); without it nothing is internal, and a client's own x-envoy-internal is
    // removed, not believed. So every request is external here: "internal" limits none.
    if config.request_type == RequestType::Internal {
        return Vec::new();
    }
    // Envoy's global filter reads a disable_key from its runtime, where an unset key means
    // enabled: such policies apply. Without a per-route config, vh_rate_limits is OVERRIDE.
    route_descriptors(source, config.stage, VhRateLimits::Override, false)
}

/// The filter's decision for a request with `descriptors` (not empty). `stats`: the route's
/// target cluster's counters (Envoy's cluster.<target>.ratelimit.*).
pub async fn decide(
    context: &Arc<HttpContext>,
    config: &Arc<GlobalRateLimit>,
    descriptors: Vec<Descriptor>,
    stats: &Arc<ClusterStats>,
    grpc: bool,
) -> Decision {
    let counters = &stats.resilience;
    let mut waiting_since = None;
    loop {
        // Made before deciding: a call that ends in between still wakes this request.
        let changed = config.quota.changed.notified();
        let now = Instant::now();
        match config.quota.decide(&descriptors, now, config.timeout, waiting_since) {
            Local::Admit { refill } => {
                counters.ratelimit_quota_admitted.fetch_add(1, Relaxed);
                if refill {
                    tokio::spawn(refill_quota(context.clone(), config.clone(), descriptors, stats.clone()));
                }
                return Decision::Allow(None);
            }
            Local::Refuse => {
                counters.ratelimit_quota_refused.fetch_add(1, Relaxed);
                context.stats.response_flags.record(ResponseFlag::RateLimited);
                return Decision::Reply(Box::new(caused(limited_reply(config, Vec::new(), None, grpc), Some(ResponseFlag::RateLimited), "request_rate_limited")));
            }
            Local::Failed => return service_failed(context, config, counters, grpc),
            Local::Wait => {
                // Bounded as the call itself is: a request waits no longer than one call may take.
                let since = *waiting_since.get_or_insert(now);
                if tokio::time::timeout_at((since + config.timeout).into(), changed).await.is_err() {
                    return service_failed(context, config, counters, grpc);
                }
            }
            Local::Ask => break,
        }
    }
    let mut call = CallUnderWay { config, descriptors: &descriptors, outcome: AskOutcome::Failed };
    let response = match ask(context, config, &descriptors).await {
        Ok(response) => response,
        Err(_) => return service_failed(context, config, counters, grpc), // `call` tells the waiters
    };
    let headers = service_headers(&response);
    call.outcome = if granted_all(&response, descriptors.len()) { AskOutcome::Granted } else { AskOutcome::NoGrant };
    // Envoy takes anything but OVER_LIMIT (UNKNOWN included) as OK.
    if response.overall_code == rate_limit_response::Code::OverLimit as i32 {
        counters.ratelimit_over_limit.fetch_add(1, Relaxed);
        remember_quota(config, &descriptors, &response.statuses, 0);
        drop(call);
        context.stats.response_flags.record(ResponseFlag::RateLimited);
        let reply = limited_reply(config, response.raw_body, headers.as_deref(), grpc);
        return Decision::Reply(Box::new(caused(reply, Some(ResponseFlag::RateLimited), "request_rate_limited")));
    }
    counters.ratelimit_ok.fetch_add(1, Relaxed);
    remember_quota(config, &descriptors, &response.statuses, 0);
    drop(call);
    Decision::Allow(headers)
}

/// A request's own call, from the moment the cache marked it under way: however the request
/// ends (answered, failed, or dropped with its client), the requests waiting for it are told.
struct CallUnderWay<'a> {
    config: &'a GlobalRateLimit,
    descriptors: &'a [Descriptor],
    outcome: AskOutcome,
}

impl Drop for CallUnderWay<'_> {
    fn drop(&mut self) {
        let now = Instant::now();
        for descriptor in self.descriptors {
            self.config.quota.ask_over(descriptor, self.outcome, now);
        }
        self.config.quota.changed.notify_waiters();
    }
}

/// Whether the service granted quota for every descriptor.
fn granted_all(response: &RateLimitResponse, descriptors: usize) -> bool {
    (0..descriptors).all(|index| granted(response, index))
}

/// Whether an admitting answer granted quota for the descriptor at `index` (statuses match the
/// request's descriptors by position).
fn granted(response: &RateLimitResponse, index: usize) -> bool {
    response.overall_code != rate_limit_response::Code::OverLimit as i32
        && response.statuses.get(index).and_then(|s| s.quota.as_ref()).is_some_and(|q| q.requests > 0)
}

/// The service could not be asked (error or timeout): Envoy's failure mode, counted as Envoy does.
fn service_failed(context: &HttpContext, config: &GlobalRateLimit, counters: &ResilienceStats, grpc: bool) -> Decision {
    counters.ratelimit_error.fetch_add(1, Relaxed);
    if config.failure_mode_deny {
        context.stats.response_flags.record(ResponseFlag::RateLimitServiceError);
        let reply = local_reply(config.status_on_error, "", grpc);
        return Decision::Reply(Box::new(caused(reply, Some(ResponseFlag::RateLimitServiceError), "rate_limiter_error")));
    }
    counters.ratelimit_failure_mode_allowed.fetch_add(1, Relaxed);
    Decision::Allow(None)
}

/// One ShouldRateLimit call for `descriptors`, offering to take quota.
async fn ask(context: &Arc<HttpContext>, config: &GlobalRateLimit, descriptors: &[Descriptor]) -> Result<RateLimitResponse, grpc_unary::CallError> {
    let request = RateLimitRequest {
        domain: config.domain.clone(),
        descriptors: descriptors
            .iter()
            .map(|d| RateLimitDescriptor {
                entries: d.iter().map(|(key, value)| Entry { key: key.clone(), value: value.clone() }).collect(),
                ..Default::default()
            })
            .collect(),
        hits_addend: 0,
    };
    let metadata = [(HeaderName::from_static(QUOTA_METADATA), HeaderValue::from_static("1"))];
    let target = grpc_unary::Target { cluster: &config.cluster, authority: &config.authority, path: SHOULD_RATE_LIMIT };
    grpc_unary::call(context, target, &metadata, frame(&request), config.timeout)
        .await
        .and_then(|bytes| RateLimitResponse::decode(bytes).map_err(|_| grpc_unary::CallError::Malformed("not a RateLimitResponse")))
}

/// Asks, off the request path, for more quota for descriptors running low, so that the requests
/// after it find quota instead of waiting for a call. The service counts the call as one request
/// (hits_addend 0 is 1) that nobody sends: on OK that one is added to the grants. Its headers and
/// raw body answer no request and are dropped. A failure leaves the grants held as they were,
/// and no refill is asked again until a request's own call brings a grant.
async fn refill_quota(context: Arc<HttpContext>, config: Arc<GlobalRateLimit>, descriptors: Vec<Descriptor>, stats: Arc<ClusterStats>) {
    let counters = &stats.resilience;
    counters.ratelimit_quota_refills.fetch_add(1, Relaxed);
    match ask(&context, &config, &descriptors).await {
        Ok(response) => {
            let admitted = response.overall_code != rate_limit_response::Code::OverLimit as i32;
            remember_quota(&config, &descriptors, &response.statuses, u32::from(admitted));
            let now = Instant::now();
            for (index, descriptor) in descriptors.iter().enumerate() {
                config.quota.refill_over(descriptor, granted(&response, index), now);
            }
        }
        Err(_) => {
            counters.ratelimit_quota_refill_errors.fetch_add(1, Relaxed);
            let now = Instant::now();
            for descriptor in &descriptors {
                config.quota.refill_over(descriptor, false, now);
            }
        }
    }
}

/// A meshctl service's quota for each descriptor it answered with one (statuses match the
/// request's descriptors by position): an OK with N requests is a grant (plus `unsent`: requests
/// the call was counted for that were not sent); an OVER_LIMIT with none a refusal until
/// valid_until, so that refused traffic stops calling too.
fn remember_quota(config: &GlobalRateLimit, descriptors: &[Descriptor], statuses: &[rate_limit_response::DescriptorStatus], unsent: u32) {
    use rate_limit_response::quota::ExpirationSpecifier;
    let (now, wall) = (Instant::now(), SystemTime::now());
    for (descriptor, status) in descriptors.iter().zip(statuses) {
        let Some(quota) = &status.quota else { continue };
        let refused = status.code == rate_limit_response::Code::OverLimit as i32;
        if refused != (quota.requests == 0) {
            continue; // a grant on a refusal, or an empty grant on an OK: not the contract
        }
        let Some(ExpirationSpecifier::ValidUntil(until)) = &quota.expiration_specifier else { continue };
        let Ok(seconds) = u64::try_from(until.seconds) else { continue };
        let until = SystemTime::UNIX_EPOCH + std::time::Duration::new(seconds, until.nanos.clamp(0, 999_999_999) as u32);
        let Ok(left) = until.duration_since(wall) else { continue };
        if refused {
            config.quota.refuse(descriptor, now + left, now);
        } else {
            config.quota.grant(descriptor, quota.requests.saturating_add(unsent), now + left, now);
        }
    }
}

fn service_headers(response: &RateLimitResponse) -> Option<Box<ServiceHeaders>> {
    if response.response_headers_to_add.is_empty() && response.request_headers_to_add.is_empty() {
        return None;
    }
    let convert = |headers: &[ProtoHeader]| {
        headers
            .iter()
            .filter_map(|h| {
                let value = if h.raw_value.is_empty() { h.value.as_bytes() } else { &h.raw_value[..] };
                Some((HeaderName::from_bytes(h.key.as_bytes()).ok()?, HeaderValue::from_bytes(value).ok()?))
            })
            .collect()
    };
    Some(Box::new(ServiceHeaders {
        request: convert(&response.request_headers_to_add),
        response: convert(&response.response_headers_to_add),
    }))
}

/// Envoy's reply to OVER_LIMIT: rate_limited_status with x-envoy-ratelimited: true, the service's
/// body (raw_body) and response headers; gRPC requests get UNAVAILABLE (or RESOURCE_EXHAUSTED).
fn limited_reply(config: &GlobalRateLimit, body: Vec<u8>, headers: Option<&ServiceHeaders>, grpc: bool) -> Response<ResponseBody> {
    let mut response = if grpc && config.rate_limited_as_resource_exhausted {
        let mut response = Response::new(ResponseBody::empty());
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert("grpc-status", HeaderValue::from_static("8"));
        response
    } else if grpc || body.is_empty() {
        local_reply(config.rate_limited_status, "", grpc)
    } else {
        let mut response = Response::new(ResponseBody::text(body));
        *response.status_mut() = config.rate_limited_status;
        response
    };
    if !config.omit_ratelimited_header {
        response.headers_mut().insert("x-envoy-ratelimited", HeaderValue::from_static("true"));
    }
    if let Some(headers) = headers {
        ServiceHeaders::append_to(&headers.response, response.headers_mut());
    }
    response
}
