"""RateLimit (policy.meshctl.io/v1alpha1): limits on a service's traffic, per rule, counted by each
sidecar on its own (scope local, token buckets) or once for the whole mesh by the control plane's
rate limit service (scope global, fixed windows); meshctl's own kind beside Istio's untouched ones."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Literal

from pydantic import Field

from meshctl.resources.common import Duration, MeshModel, StringMatch, duration_seconds

UNIT_SECONDS = {"second": 1, "minute": 60, "hour": 3600}
# The rate limit descriptor entry key every compiled rule's action writes, its value naming the
# rule (namespace/name/index): the compiler writes it, sidecars and the plane read counts by it.
DESCRIPTOR_KEY = "meshctl_rate_limit"
# A sidecar reports at most this many rules' counts with a renewal (the plane refuses more): its
# config would need 64 RateLimits of 64 rules; past it, the rest go unreported, never the lease.
MAX_REPORTED_RULES = 4096
Unit = Literal["second", "minute", "hour"]
# Envoy's token buckets count in uint32: requests + burst must fit.
MAX_TOKENS = 2**32 - 1
MAX_RULES = 64
# Envoy's min_concurrency default: the adaptive limit while it measures the app's minimum latency.
ADAPTIVE_MIN_CONCURRENCY = 3
# The status codes Envoy's HttpStatus can carry (envoy.type.v3.StatusCode), 4xx and 5xx only:
# a rate-limited request is refused, never answered as a success or a redirect.
REFUSAL_STATUSES = frozenset({
    400, 401, 402, 403, 404, 405, 406, 407, 408, 409, 410, 411, 412, 413, 414, 415, 416, 417,
    421, 422, 423, 424, 426, 428, 429, 431,
    500, 501, 502, 503, 504, 505, 506, 507, 508, 510, 511,
})  # fmt: skip
Count = Annotated[int, Field(ge=1, le=MAX_TOKENS)]


class RuleMatch(MeshModel):
    """Which requests a rule counts; every field set must match (AND). `path` is the path
    without its query string, as a VirtualService's `uri`. The source fields need the caller's
    mTLS identity: a plaintext caller matches none."""

    path: StringMatch | None = None
    method: str | None = None
    headers: dict[str, StringMatch] | None = None
    # The caller, as AuthorizationPolicy's `source` names it: principals (trust-domain/ns/NS/sa/SA)
    # and namespaces, each with Istio's `*` at one end. Any of the listed ones (OR).
    source_principals: list[str] | None = None
    source_namespaces: list[str] | None = None


class Limit(MeshModel):
    """`requests` per `unit`, plus `burst` more that a quiet spell saves up."""

    requests: Count
    unit: Unit
    burst: Count | None = None


class Concurrency(MeshModel):
    """At most `maxConcurrent` requests in the app at once; `queue` more wait for a slot (Sentinel's
    queueing), each at most `queueTimeout`; the rest are refused at once (503).

    `adaptive: true` instead lets the limit follow the app's latency (Envoy's adaptive concurrency
    filter, a gradient controller as Netflix's Gradient2): it grows while the `latencyPercentile`
    of each `updateInterval`'s requests stays near the app's minimum latency (measured every
    `minRttInterval` from `minRttRequests` requests let in 3 at a time) and shrinks as it rises, up
    to `maxConcurrent` (default 1000). Requests over the limit are refused at once (503), none wait."""

    max_concurrent: Count | None = None
    queue: Annotated[int, Field(ge=0, le=MAX_TOKENS)] = 0
    queue_timeout: Duration | None = None
    adaptive: bool = False
    latency_percentile: Annotated[float, Field(gt=0, le=100)] | None = None
    update_interval: Duration | None = None
    min_rtt_interval: Duration | None = None
    min_rtt_requests: Count | None = None


class RateLimitResponse(MeshModel):
    status: int = 429
    headers: dict[str, str] = Field(default_factory=dict)
    body: str | None = None


class RateLimitRule(MeshModel):
    match: RuleMatch | None = None
    # Exactly one: a rate (requests per unit) or a concurrency limit (requests at once).
    limit: Limit | None = None
    concurrency: Concurrency | None = None
    scope: Literal["local", "global"] = "local"
    shadow: bool = False
    response: RateLimitResponse | None = None


class RateLimitSelector(MeshModel):
    match_labels: dict[str, str] = Field(default_factory=dict)


class RateLimitSpec(MeshModel):
    selector: RateLimitSelector | None = None
    host: str | None = None
    rules: list[RateLimitRule]
    # Global rules when the rate limit service cannot be asked (unreachable, slow, refusing):
    # false lets requests through (fail open, Envoy's default), true refuses them. On the spec,
    # not the rule: a sidecar asks the service once per request for all the rules it matches.
    failure_mode_deny: bool = False


def max_tokens(limit: Limit) -> int:
    """The bucket's size: a full unit's worth plus the burst (it starts full)."""
    return limit.requests + (limit.burst or 0)


def problems(spec: RateLimitSpec) -> Iterator[tuple[str, str]]:
    """Rules the schema cannot say alone; (field path, reason)."""
    if (spec.selector is None) == (spec.host is None):
        yield "spec", ("set exactly one of selector (the inbound traffic of these workloads) "
                       "or host (callers' outbound traffic to this service)")  # fmt: skip
    if spec.host is not None:
        if not spec.host.strip():
            yield "spec.host", "is empty; name a service, e.g. reviews or reviews.default.svc.cluster.local"
        elif "*" in spec.host:
            yield "spec.host", f"{spec.host!r} is a wildcard; name one service"
    if spec.failure_mode_deny and not any(rule.scope == "global" for rule in spec.rules):
        yield "spec.failureModeDeny", ("applies to global rules only (when the rate limit service "
                                       "cannot be asked); this RateLimit has none")  # fmt: skip
    if not spec.rules:
        yield "spec.rules", "is empty: the RateLimit would limit nothing"
    elif len(spec.rules) > MAX_RULES:
        yield "spec.rules", f"has {len(spec.rules)} rules; at most {MAX_RULES}"
    first_response: tuple[int, tuple[int, list[tuple[str, str]]]] | None = None
    first_adaptive: int | None = None
    for index, rule in enumerate(spec.rules):
        here = f"spec.rules[{index}]"
        if rule.concurrency is not None and rule.concurrency.adaptive:
            if first_adaptive is None:
                first_adaptive = index
            else:
                yield f"{here}.concurrency.adaptive", (f"spec.rules[{first_adaptive}] is already adaptive: a workload "
                                                       "has one adaptive limit, for all its requests")  # fmt: skip
        if (rule.limit is None) == (rule.concurrency is None):
            yield here, "set exactly one of limit (requests per unit) or concurrency (requests at once)"
        if rule.limit is not None and max_tokens(rule.limit) > MAX_TOKENS:
            yield f"{here}.limit", f"requests + burst is {max_tokens(rule.limit)}; at most {MAX_TOKENS}"
        if rule.concurrency is not None:
            yield from _concurrency_problems(spec, rule, here)
        if rule.match is not None:
            yield from _match_problems(rule.match, f"{here}.match")
            if spec.host is not None and rule.match.source_principals is not None:
                yield f"{here}.match.sourcePrincipals", (
                    "a host rule is counted by each caller's own sidecar, whose outbound routes are "
                    "shared by its namespace: name callers by sourceNamespaces here, or limit by "
                    "principal at the callee (spec.selector)"
                )  # fmt: skip
        if rule.response is not None:
            yield from _response_problems(rule.response, f"{here}.response")
        if rule.concurrency is not None:
            continue  # answered by the cluster's circuit breaker, not the rate limit filter
        # One filter config answers every rule of a route: one status and header set.
        response = rule.response or RateLimitResponse()
        shown = (response.status, sorted(response.headers.items()))
        if first_response is None:
            first_response = (index, shown)
        elif first_response[1] != shown:
            yield f"{here}.response", (
                f"differs from spec.rules[{first_response[0]}].response: the sidecars answer one status "
                "and header set for all the rules of a RateLimit; give every rule the same response"
            )


def _match_problems(match: RuleMatch, here: str) -> Iterator[tuple[str, str]]:
    if match.path is not None:
        if match.path.exact is not None and not match.path.exact.startswith("/"):
            yield f"{here}.path.exact", f"{match.path.exact!r} matches no request: a path starts with '/'"
        if match.path.prefix == "":
            yield f"{here}.path.prefix", "is empty; omit path to match every path (or write prefix: /)"
        elif match.path.prefix is not None and not match.path.prefix.startswith("/"):
            yield f"{here}.path.prefix", f"{match.path.prefix!r} matches no request: a path starts with '/'"
        if match.path.regex is not None and not match.path.regex:
            yield f"{here}.path.regex", "is empty: it matches no request (a path is never empty)"
    if match.method is not None and (
        not match.method or not match.method.isalpha() or match.method.upper() != match.method
    ):
        yield f"{here}.method", f"{match.method!r} matches no request: write a method in capitals, e.g. GET"
    for field, values in (("sourcePrincipals", match.source_principals), ("sourceNamespaces", match.source_namespaces)):
        if values is None:
            continue
        if not values:
            yield f"{here}.{field}", "is empty: it would match no caller; omit it to match every caller"
        for index, value in enumerate(values):
            if problem := _source_problem(value, namespace=field == "sourceNamespaces"):
                yield f"{here}.{field}[{index}]", problem
    for name, value in (match.headers or {}).items():
        if not _is_header_name(name):
            yield f"{here}.headers.{name}", "not a header name (lowercase letters, digits, '-')"
        elif value.prefix == "":
            yield f"{here}.headers.{name}", "an empty prefix; to match any value of the header write regex: '.*'"
        elif value.regex == "":
            yield f"{here}.headers.{name}", "an empty regex matches only an empty value; use exact: '' for that"


def _concurrency_problems(spec: RateLimitSpec, rule: RateLimitRule, here: str) -> Iterator[tuple[str, str]]:
    if spec.host is not None:
        yield f"{here}.concurrency", ("a concurrency limit protects the workloads a selector picks (their "
                                      "inbound traffic); callers limit their own with a DestinationRule's "
                                      "connectionPool")  # fmt: skip
    if rule.scope != "local":
        yield f"{here}.scope", "a concurrency limit is each sidecar's own (scope: local)"
    if rule.shadow:
        yield f"{here}.shadow", "a concurrency limit cannot be shadow: nothing counts what it would have refused"
    if rule.response is not None:
        yield f"{here}.response", ("a refused request gets the sidecar's own 503 (Envoy's overflow reply); "
                                   "a concurrency rule takes no response")  # fmt: skip
    if rule.match is not None and (rule.match.source_principals is not None or rule.match.source_namespaces is not None):
        yield f"{here}.match", "a concurrency limit is the workload's, whoever calls: match on path, method or headers"
    concurrency = rule.concurrency
    if concurrency is not None and concurrency.adaptive:
        yield from _adaptive_problems(rule, concurrency, here)
        return
    if concurrency is not None and concurrency.max_concurrent is None:
        yield f"{here}.concurrency.maxConcurrent", "is required (or set adaptive: true to let latency set the limit)"
    for field in ADAPTIVE_ONLY:
        if concurrency is not None and getattr(concurrency, _snake(field)) is not None:
            yield f"{here}.concurrency.{field}", "applies to adaptive: true only"
    timeout = rule.concurrency.queue_timeout if rule.concurrency else None
    if timeout is not None and rule.concurrency.queue == 0:
        yield f"{here}.concurrency.queueTimeout", "there is no queue (queue: 0) to time out of"
    elif timeout is not None and duration_seconds(timeout) <= 0:
        yield f"{here}.concurrency.queueTimeout", "must be more than 0s"


ADAPTIVE_ONLY = ("latencyPercentile", "updateInterval", "minRttInterval", "minRttRequests")


def _snake(field: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in field)


def _adaptive_problems(rule: RateLimitRule, concurrency: Concurrency, here: str) -> Iterator[tuple[str, str]]:
    if rule.match is not None:
        yield f"{here}.match", ("an adaptive limit covers all of the workload's inbound requests (Envoy's "
                                "adaptive concurrency filter has no per-route config): remove match")  # fmt: skip
    if concurrency.queue:
        yield f"{here}.concurrency.queue", "an adaptive limit queues nothing: over the limit a request is refused at once"
    if concurrency.queue_timeout is not None:
        yield f"{here}.concurrency.queueTimeout", "an adaptive limit queues nothing: there is no queue to time out of"
    for field in ("updateInterval", "minRttInterval"):
        value = getattr(concurrency, _snake(field))
        if value is not None and duration_seconds(value) <= 0:
            yield f"{here}.concurrency.{field}", "must be more than 0s"
    if concurrency.max_concurrent is not None and concurrency.max_concurrent < ADAPTIVE_MIN_CONCURRENCY:
        yield f"{here}.concurrency.maxConcurrent", (
            f"is the adaptive limit's upper bound; at least {ADAPTIVE_MIN_CONCURRENCY} (the limit while the "
            "app's minimum latency is measured)"
        )  # fmt: skip


def _source_problem(value: str, namespace: bool) -> str | None:
    """Istio's rule for source values: `*` alone, or at the start or the end, nowhere else."""
    if not value:
        return "is empty; write * for any authenticated caller"
    if "*" in value.strip("*") or value.count("*") > 1 and value != "*":
        return f"{value!r}: * may stand only alone, at the start or at the end (as in Istio)"
    if any(c in value for c in ";,\"") or any(ord(c) < 0x21 or ord(c) == 0x7F for c in value):
        return f"{value!r} has a character no SPIFFE ID has"
    if namespace and "/" in value:
        return f"{value!r}: a namespace has no '/'; name principals in sourcePrincipals"
    if not namespace and value.startswith("spiffe://"):
        return f"{value!r}: write principals without spiffe://, as AuthorizationPolicy does (e.g. cluster.local/ns/default/sa/productpage)"
    return None


def _response_problems(response: RateLimitResponse, here: str) -> Iterator[tuple[str, str]]:
    if response.status not in REFUSAL_STATUSES:
        yield f"{here}.status", f"{response.status} is not a 4xx or 5xx status the sidecars can answer (e.g. 429, 503)"
    if response.body is not None:
        yield f"{here}.body", ("a custom body is not supported: Envoy's local rate limit filter answers "
                               "with its own fixed body; set status and headers only")  # fmt: skip
    for name, value in response.headers.items():
        if not _is_header_name(name):
            yield f"{here}.headers.{name}", "not a header name (lowercase letters, digits, '-')"
        elif any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            yield f"{here}.headers.{name}", "control characters are not allowed in a header value"


def _is_header_name(name: str) -> bool:
    return bool(name) and all(c.isalnum() or c in "-_" for c in name) and name.lower() == name and name.isascii()
