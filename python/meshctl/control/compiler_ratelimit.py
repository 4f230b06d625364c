"""RateLimit resources in Envoy's terms: the local rate limit filter before the router, a
LocalRateLimit in each limited virtual host's typed_per_filter_config with one descriptor (token
bucket) per rule, and route `rate_limits` actions that give a request the descriptors of the rules
it matches. A `host` limits callers' outbound routes to that service; a `selector` the selected
workloads' inbound route.

Shadow rules: Envoy's filter_enforced is per filter config, not per descriptor. A virtual host whose
rules are all shadow (or all enforced) needs one filter; one that mixes both gets its shadow rules in
a second instance of the filter, whose config is never enforced.

Global rules (`scope: global`) get the same actions (one descriptor naming the rule), asked of the
control plane's rate limit service by the global filter (compiler_ratelimit_global) after the local
ones; the local filter configs list only local rules."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from meshctl.control import compiler_ratelimit_global as global_limits
from meshctl.control.compiler_matchers import string_match
from meshctl.resources.common import StringMatch
from meshctl.resources.hosts import canonical_host
from meshctl.resources.rate_limit import (
    DESCRIPTOR_KEY,
    MAX_TOKENS,
    UNIT_SECONDS,
    RateLimitResponse,
    RateLimitRule,
    RateLimitSpec,
    RuleMatch,
    max_tokens,
)

Json = dict[str, Any]

FILTER = "envoy.filters.http.local_ratelimit"
SHADOW_FILTER = "envoy.filters.http.local_ratelimit.shadow"
TYPE = "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"
STAT_PREFIX = "local_rate_limit"
SHADOW_STAT_PREFIX = "local_rate_limit_shadow"
# A per-route LocalRateLimit must have a default bucket, and Envoy takes a token from it for every
# request (always_consume_default_token_bucket defaults to true). Requests no rule matches must not
# be limited, so the default bucket is as large as Envoy's uint32 allows, refilled every second.
UNLIMITED = {"max_tokens": MAX_TOKENS, "tokens_per_fill": MAX_TOKENS, "fill_interval": "1s"}
_ALWAYS = {"default_value": {"numerator": 100, "denominator": "HUNDRED"}}
_NEVER = {"default_value": {"numerator": 0, "denominator": "HUNDRED"}}


@dataclass(frozen=True)
class AppliedRule:
    """One rule of one RateLimit, with the descriptor value that names it in Envoy's config."""

    descriptor: str
    rule: RateLimitRule
    failure_mode_deny: bool = False  # the RateLimit's: for a global rule when the service is away

    @property
    def is_global(self) -> bool:
        return self.rule.scope == "global"


def rules_by_host(rate_limits: Iterable[Any]) -> dict[str, list[AppliedRule]]:
    """Host → the rules of every RateLimit naming it, oldest resource first."""
    found: dict[str, list[AppliedRule]] = {}
    for stored in rate_limits:
        spec: RateLimitSpec = stored.spec
        if spec.host is not None:
            found.setdefault(canonical_host(spec.host, stored.namespace), []).extend(_applied(stored))
    return found


def rules_for_workload(rate_limits: Iterable[Any], namespace: str, labels: Mapping[str, str]) -> list[AppliedRule]:
    """The rules of every RateLimit whose selector picks this workload (same namespace)."""
    found: list[AppliedRule] = []
    for stored in rate_limits:
        selector = stored.spec.selector
        if selector is None or stored.namespace != namespace:
            continue
        if all(labels.get(key) == value for key, value in selector.match_labels.items()):
            found.extend(_applied(stored))
    return found


def _applied(stored: Any) -> list[AppliedRule]:
    """The rate rules (those with a limit; concurrency rules are compiler_concurrency's)."""
    return [
        AppliedRule(global_limits.rule_name(stored.namespace, stored.name, index), rule,
                    bool(stored.spec.failure_mode_deny))
        for index, rule in enumerate(stored.spec.rules)
        if rule.limit is not None
    ]  # fmt: skip


def listener_filters(targets: Iterable[Sequence[AppliedRule]]) -> list[Json]:
    """The connection manager's rate limit filters (before the router) that its virtual hosts'
    rules need, one list of rules per virtual host. Without a per-route config a filter is
    disabled, so unlimited routes pass it untouched."""
    targets = [list(rules) for rules in targets if rules]
    local = [[r for r in rules if not r.is_global] for rules in targets]
    local = [rules for rules in local if rules]
    filters = []
    if local:
        filters.append({"name": FILTER, "typed_config": {"@type": TYPE, "stat_prefix": STAT_PREFIX}})
    if any(_mixed(rules) for rules in local):
        # First: it never stops a request, so it sees (counts) those the enforced one refuses.
        filters.insert(0, {"name": SHADOW_FILTER, "typed_config": {"@type": TYPE, "stat_prefix": SHADOW_STAT_PREFIX}})
    # Last: a request the sidecar refuses on its own does not spend the mesh-wide limit.
    global_filter = global_limits.listener_filter(r for rules in targets for r in rules if r.is_global)
    if global_filter is not None:
        filters.append(global_filter)
    return filters


def _mixed(rules: Sequence[AppliedRule]) -> bool:
    return len({r.rule.shadow for r in rules}) == 2


def insert_filters(manager: Json, filters: Sequence[Json]) -> Json:
    """`manager` (an HCM network filter) with `filters` just before its router."""
    if not filters:
        return manager
    config = dict(manager["typed_config"])
    http_filters = list(config["http_filters"])
    http_filters[-1:-1] = filters  # the router is last
    config["http_filters"] = http_filters
    return {**manager, "typed_config": config}


def limit_virtual_host(virtual_host: Json, rules: Sequence[AppliedRule]) -> None:
    """Put `rules` on one virtual host: its filter configs, and the actions on each forwarding route
    (a redirect has no route action: nothing to count it against)."""
    if not rules:
        return
    actions = [
        {"stage": global_limits.STAGE, "actions": [_action(applied)]} if applied.is_global else {"actions": [_action(applied)]}
        for applied in rules
    ]
    for route in virtual_host["routes"]:
        if "route" in route:
            # A copy: routes of one VirtualService http entry share their action dict.
            route["route"] = {**route["route"], "rate_limits": actions}
    local = [r for r in rules if not r.is_global]
    if not local:
        return
    configs = virtual_host.setdefault("typed_per_filter_config", {})
    enforced = [r for r in local if not r.rule.shadow]
    shadow = [r for r in local if r.rule.shadow]
    if enforced:
        configs[FILTER] = _filter_config(enforced, STAT_PREFIX, _ALWAYS)
    if shadow:
        configs[SHADOW_FILTER if enforced else FILTER] = _filter_config(shadow, SHADOW_STAT_PREFIX, _NEVER)


def _filter_config(rules: Sequence[AppliedRule], stat_prefix: str, enforced: Json) -> Json:
    # One status and header set per config: the oldest rule's (rules of one RateLimit agree).
    response = rules[0].rule.response or RateLimitResponse()
    config: Json = {
        "@type": TYPE,
        "stat_prefix": stat_prefix,
        "status": {"code": response.status},
        "token_bucket": UNLIMITED,
        "filter_enabled": _ALWAYS,
        "filter_enforced": enforced,
        "descriptors": [
            {"entries": [{"key": DESCRIPTOR_KEY, "value": r.descriptor}], "token_bucket": token_bucket(r.rule)}
            for r in rules
        ],
    }
    if response.headers:
        config["response_headers_to_add"] = [
            {"header": {"key": key, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
            for key, value in sorted(response.headers.items())
        ]
    return config


def token_bucket(rule: RateLimitRule) -> Json:
    """`requests` per unit, refilled whole at each unit's end; the bucket holds `burst` more."""
    limit = rule.limit
    return {
        "max_tokens": max_tokens(limit),
        "tokens_per_fill": limit.requests,
        "fill_interval": f"{UNIT_SECONDS[limit.unit]}s",
    }


def _action(applied: AppliedRule) -> Json:
    """The rate limit action that yields the rule's descriptor for the requests it matches."""
    headers = _headers(applied.rule)
    if not headers:
        return {"generic_key": {"descriptor_key": DESCRIPTOR_KEY, "descriptor_value": applied.descriptor}}
    return {
        "header_value_match": {
            "descriptor_key": DESCRIPTOR_KEY,
            "descriptor_value": applied.descriptor,
            "headers": headers,
        }
    }


def _headers(rule: RateLimitRule) -> list[Json]:
    """The rule's match as header matchers, all of which must match."""
    match = rule.match
    if match is None:
        return []
    headers = []
    if match.path is not None:
        headers.append({"name": ":path", "string_match": _path_match(match.path)})
    if match.method is not None:
        headers.append({"name": ":method", "string_match": {"exact": match.method}})
    for name, value in sorted((match.headers or {}).items()):
        headers.append({"name": name, "string_match": string_match(value)})
    return headers + _source_headers(match)


# The inbound connection manager replaces any x-forwarded-client-cert a caller sent with its own
# account of the mTLS peer (SANITIZE_SET, URI=the peer's SPIFFE ID) before any filter runs, on Envoy
# and on meshctl: a rule on the caller's identity is a match on that header. Elements are separated
# by ',' and fields by ';', neither of which a SPIFFE ID holds. Envoy's safe_regex matches the whole value.
XFCC = "x-forwarded-client-cert"


def _source_headers(match: RuleMatch) -> list[Json]:
    """The rule's sourcePrincipals and sourceNamespaces as matches on the sanitized XFCC header."""
    headers = []
    if match.source_principals is not None:
        headers.append(_peer_uri([_wildcard(value, "[^;,]") for value in match.source_principals]))
    if match.source_namespaces is not None:
        headers.append(_peer_uri([f"[^/;,]+/ns/{_wildcard(value, '[^/;,]')}/sa/[^;,]+" for value in match.source_namespaces]))
    return headers


def _wildcard(value: str, any_char: str) -> str:
    """An Istio source value (`*` alone or at one end) as a regex over one ID's characters."""
    if value == "*":
        return f"{any_char}+"
    escaped = re.escape(value.strip("*"))
    if value.startswith("*"):
        return f"{any_char}*{escaped}"
    if value.endswith("*"):
        return f"{escaped}{any_char}*"
    return escaped


def _peer_uri(alternatives: list[str]) -> Json:
    pattern = "|".join(alternatives)
    return {"name": XFCC, "string_match": {"safe_regex": {"regex": f"(?:.*[;,])?URI=spiffe://(?:{pattern})(?:[;,].*)?"}}}


def uses_source(rules: Sequence[AppliedRule]) -> bool:
    """Whether a rule names callers: the inbound connection manager must then sanitize XFCC."""
    return any(r.rule.match is not None and (r.rule.match.source_principals is not None
               or r.rule.match.source_namespaces is not None) for r in rules)  # fmt: skip


def for_caller_namespace(rules: Sequence[AppliedRule], namespace: str) -> list[AppliedRule]:
    """The host rules that count the callers of `namespace`, whose sidecars share one outbound route
    table: those without sourceNamespaces, and those whose sourceNamespaces name it, decided here
    (on the caller's own side XFCC is whatever its app sent: nothing to match on the wire)."""
    chosen = []
    for applied in rules:
        match = applied.rule.match
        if match is None or match.source_namespaces is None:
            chosen.append(applied)
        elif any(re.fullmatch(_wildcard(value, "[^/]"), namespace) for value in match.source_namespaces):
            unsourced = applied.rule.model_copy(update={"match": match.model_copy(update={"source_namespaces": None})})
            chosen.append(replace(applied, rule=unsourced))
    return chosen


def _path_match(match: StringMatch) -> Json:
    """`:path` carries the query string, a route's path match does not: exact and regex matches
    allow an optional query after the path so that both mean the same."""
    if match.prefix is not None:
        return {"prefix": match.prefix}
    pattern = re.escape(match.exact) if match.exact is not None else f"(?:{match.regex})"
    return {"safe_regex": {"regex": pattern + r"(?:\?.*)?"}}


