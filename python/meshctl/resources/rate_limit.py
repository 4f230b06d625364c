"""RateLimit (policy.meshctl.io/v1alpha1): limits on a service's traffic, per rule, counted by each
sidecar on its own (scope local, token buckets) or once for the whole mesh by the control plane's
rate limit service (scope global, fixed windows); meshctl's own kind beside Istio's untouched ones."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Literal

from pydantic import Field

from meshctl.resources.common import MeshModel, StringMatch
from meshctl.resources.support import Unsupported

UNIT_SECONDS = {"second": 1, "minute": 60, "hour": 3600}
Unit = Literal["second", "minute", "hour"]
# Envoy's token buckets count in uint32: requests + burst must fit.
MAX_TOKENS = 2**32 - 1
MAX_RULES = 64
# The status codes Envoy's HttpStatus can carry (envoy.type.v3.StatusCode), 4xx and 5xx only:
# a rate-limited request is refused, never answered as a success or a redirect.
REFUSAL_STATUSES = frozenset({
    400, 401, 402, 403, 404, 405, 406, 407, 408, 409, 410, 411, 412, 413, 414, 415, 416, 417,
    421, 422, 423, 424, 426, 428, 429, 431,
    500, 501, 502, 503, 504, 505, 506, 507, 508, 510, 511,
})  # fmt: skip
_NOT_YET_SOURCE = Unsupported(
    "matching on the caller's identity is not supported yet: the rate-limit actions the sidecars "
    "support (request headers, remote address, generic keys, header matches, destination cluster) "
    "cannot name a source principal or namespace"
)
Count = Annotated[int, Field(ge=1, le=MAX_TOKENS)]


class RuleMatch(MeshModel):
    """Which requests a rule counts; every field set must match (AND). `path` is the path
    without its query string, as a VirtualService's `uri`."""

    path: StringMatch | None = None
    method: str | None = None
    headers: dict[str, StringMatch] | None = None
    # In the issue, not expressible yet: refused by field.
    source_principals: Annotated[list[str] | None, _NOT_YET_SOURCE] = None
    source_namespaces: Annotated[list[str] | None, _NOT_YET_SOURCE] = None


class Limit(MeshModel):
    """`requests` per `unit`, plus `burst` more that a quiet spell saves up."""

    requests: Count
    unit: Unit
    burst: Count | None = None


class RateLimitResponse(MeshModel):
    status: int = 429
    headers: dict[str, str] = Field(default_factory=dict)
    body: str | None = None


class RateLimitRule(MeshModel):
    match: RuleMatch | None = None
    limit: Limit
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
    for index, rule in enumerate(spec.rules):
        here = f"spec.rules[{index}]"
        if max_tokens(rule.limit) > MAX_TOKENS:
            yield f"{here}.limit", f"requests + burst is {max_tokens(rule.limit)}; at most {MAX_TOKENS}"
        if rule.match is not None:
            yield from _match_problems(rule.match, f"{here}.match")
        if rule.response is not None:
            yield from _response_problems(rule.response, f"{here}.response")
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
    for name, value in (match.headers or {}).items():
        if not _is_header_name(name):
            yield f"{here}.headers.{name}", "not a header name (lowercase letters, digits, '-')"
        elif value.prefix == "":
            yield f"{here}.headers.{name}", "an empty prefix; to match any value of the header write regex: '.*'"
        elif value.regex == "":
            yield f"{here}.headers.{name}", "an empty regex matches only an empty value; use exact: '' for that"


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
