"""AuthorizationPolicy → a workload's inbound RBAC filters (Istio's translation), and the request
hardening its inbound HTTP connection manager gets so that policy and app see the same path.

Istio's semantics: a DENY filter, then an ALLOW filter; in each, one Envoy policy per rule, named
`ns[NS]-policy[NAME]-rule[I]`. A rule matches when one of its `from` sources, one of its `to`
operations and all its `when` conditions match; inside a source or operation the fields are
AND'ed and each field's values OR'ed; `not*` fields are negated. An ALLOW policy without rules
adds no Envoy policy, so on its own it denies everything; `rules: [{}]` allows everything.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from meshctl.resources.authorization_policy import (
    AuthorizationPolicySpec,
    Condition,
    Operation,
    Rule,
    Source,
    header_name,
)
from meshctl.resources.security_common import ROOT_NAMESPACE, selects

Json = dict[str, Any]

RBAC_TYPE = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
RBAC_FILTER = "envoy.filters.http.rbac"

# What the app sees is what the policy judged: one normalized path; escaped slashes refused
# (Istio's default); any XFCC a caller sent is replaced by the sidecar's own account of the peer.
INBOUND_HARDENING: Json = {
    "normalize_path": True,
    "merge_slashes": True,
    "path_with_escaped_slashes_action": "REJECT_REQUEST",
    "forward_client_cert_details": "SANITIZE_SET",
    "set_current_client_cert_details": {"uri": True},
}


def selecting(policies: Sequence[Any], namespace: str, labels: Mapping[str, str]) -> list[Any]:
    """The stored AuthorizationPolicies (oldest first) that apply to a workload: its namespace's
    and the root namespace's, without a selector or with one its labels satisfy."""
    return [
        policy
        for policy in policies
        if policy.namespace in (namespace, ROOT_NAMESPACE)
        and selects(policy.spec.selector, dict(labels))
    ]


def rbac_filters(policies: Sequence[Any], local_ports: Mapping[int, Sequence[int]]) -> list[Json]:
    """The RBAC HTTP filters for the selecting `policies`: DENY first, then ALLOW; none of an
    action no policy has. `local_ports` maps the ports a policy may name the workload by (its
    app port and service port) to the destination ports its requests arrive with."""
    filters = []
    for action in ("DENY", "ALLOW"):
        chosen = [p for p in policies if p.spec.action == action]
        if not chosen:
            continue
        envoy_policies: Json = {}
        for policy in chosen:
            spec: AuthorizationPolicySpec = policy.spec
            for index, rule in enumerate(spec.rules or []):
                name = f"ns[{policy.namespace}]-policy[{policy.name}]-rule[{index}]"
                envoy_policies[name] = _policy(rule, local_ports)
        filters.append(
            {
                "name": RBAC_FILTER,
                "typed_config": {
                    "@type": RBAC_TYPE,
                    "rules": {"action": action, "policies": envoy_policies},
                },
            }
        )
    return filters


def harden(manager: Json, filters: Sequence[Json]) -> Json:
    """An inbound HCM filter with the hardening fields and `filters` before its router."""
    config = {**manager["typed_config"], **INBOUND_HARDENING}
    config["http_filters"] = [*filters, *config["http_filters"]]
    return {**manager, "typed_config": config}


# --- one rule ------------------------------------------------------------------------------


def _policy(rule: Rule, local_ports: Mapping[int, Sequence[int]]) -> Json:
    when_permissions: list[Json] = []
    when_principals: list[Json] = []
    for condition in rule.when or []:
        _condition(condition, local_ports, when_permissions, when_principals)
    permissions = [
        _all("and_rules", "rules", [*_operation(to.operation, local_ports), *when_permissions])
        for to in rule.to or []
    ] or [_all("and_rules", "rules", when_permissions)]
    principals = [
        _all("and_ids", "ids", [*_source(source.source), *when_principals])
        for source in rule.from_ or []
    ] or [_all("and_ids", "ids", when_principals)]
    return {"permissions": permissions, "principals": principals}


def _all(kind: str, items: str, matchers: list[Json]) -> Json:
    return {kind: {items: matchers}} if matchers else {"any": True}


def _field(
    values: Sequence[str] | None,
    negated: Sequence[str] | None,
    make: Callable[[str], Json | list[Json]],
    *,
    ids: bool,
) -> list[Json]:
    """A field's values OR'ed, and its not-values OR'ed under a negation. `make` may turn one
    value into several alternatives (a port), which join the OR; repeats are dropped."""
    any_of, items, negate = (
        ("or_ids", "ids", "not_id") if ids else ("or_rules", "rules", "not_rule")
    )

    def alternatives(of: Sequence[str]) -> list[Json]:
        found: list[Json] = []
        for value in of:
            made = make(value)
            for matcher in made if isinstance(made, list) else [made]:
                if matcher not in found:
                    found.append(matcher)
        return found

    out: list[Json] = []
    if values:
        out.append({any_of: {items: alternatives(values)}})
    if negated:
        out.append({negate: {any_of: {items: alternatives(negated)}}})
    return out


def _operation(operation: Operation, local_ports: Mapping[int, Sequence[int]]) -> list[Json]:
    def port(value: str) -> list[Json]:
        return _port(value, local_ports)

    return [
        *_field(operation.paths, operation.not_paths, _path, ids=False),
        *_field(operation.methods, operation.not_methods, _method, ids=False),
        *_field(operation.ports, operation.not_ports, port, ids=False),
    ]


def _source(source: Source) -> list[Json]:
    return [
        *_field(source.principals, source.not_principals, _principal, ids=True),
        *_field(source.namespaces, source.not_namespaces, _namespace, ids=True),
    ]


def _condition(
    condition: Condition,
    local_ports: Mapping[int, Sequence[int]],
    permissions: list[Json],
    principals: list[Json],
) -> None:
    """`when` conditions go where Istio puts them: headers and the source with the principals,
    the destination port with the permissions."""
    key, values, negated = condition.key, condition.values, condition.not_values
    header = header_name(key)
    if header is not None:
        principals += _field(values, negated, lambda v: _header(header, v), ids=True)
    elif key == "source.principal":
        principals += _field(values, negated, _principal, ids=True)
    elif key == "source.namespace":
        principals += _field(values, negated, _namespace, ids=True)
    elif key == "destination.port":
        permissions += _field(values, negated, lambda v: _port(v, local_ports), ids=False)
    else:  # validation refuses every other key
        raise ValueError(f"unknown condition key {key!r}")


# --- one value -----------------------------------------------------------------------------


def _string_match(value: str, prefix: str = "") -> Json:
    """Istio's wildcards: `x*` a prefix, `*x` a suffix, else exact (`*` alone is handled by callers)."""
    if value.endswith("*"):
        return {"prefix": prefix + value[:-1]}
    if value.startswith("*"):
        return {"suffix": value[1:]}
    return {"exact": prefix + value}


def _path(value: str) -> Json:
    if value == "*":
        return {"any": True}
    return {"url_path": {"path": _string_match(value)}}


def _header(name: str, value: str) -> Json:
    if value == "*":
        return {"header": {"name": name, "present_match": True}}
    return {"header": {"name": name, "string_match": _string_match(value)}}


def _method(value: str) -> Json:
    return _header(":method", value)


def _port(value: str, local_ports: Mapping[int, Sequence[int]]) -> list[Json]:
    # A policy names the workload's port (its app or service port, as in Istio); on the wire a
    # mesh caller reaches the inbound listener's port, and a captured caller the app port.
    number = int(value)
    return [{"destination_port": local} for local in local_ports.get(number, (number,))]


def _principal(value: str) -> Json:
    if value == "*":
        # Any authenticated peer (a non-empty principal), as Istio writes it.
        return {"authenticated": {"principal_name": {"safe_regex": {"regex": ".+"}}}}
    return {"authenticated": {"principal_name": _string_match(value, "spiffe://")}}


_REGEX_SPECIAL = re.compile(r"([.^$*+?()\[\]{}|\\])")


def _namespace(value: str) -> Json:
    """A namespace is any SPIFFE ID in it: spiffe://TD/ns/NS/sa/SA."""
    if value == "*":
        pattern = "[^/]+"
    else:
        inner = _REGEX_SPECIAL.sub(r"\\\1", value.strip("*"))
        pattern = (
            f"{inner}[^/]*"
            if value.endswith("*")
            else f"[^/]*{inner}"
            if value.startswith("*")
            else inner
        )
    return {
        "authenticated": {
            "principal_name": {"safe_regex": {"regex": f"spiffe://[^/]+/ns/{pattern}/sa/[^/]+"}}
        }
    }
