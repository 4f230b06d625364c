"""AuthorizationPolicy: which peers (by SPIFFE identity) may call which operations of a workload."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Annotated, Any

from pydantic import AfterValidator, Field

from meshctl.resources.common import MeshModel
from meshctl.resources.security_common import (
    TargetRefsUnsupported,
    TargetRefUnsupported,
    WorkloadSelector,
)
from meshctl.resources.support import Unsupported

NEEDS_JWT = Annotated[
    Any,
    Unsupported("request principals need RequestAuthentication (JWT), which is not supported yet"),
]
BY_ADDRESS = Annotated[
    Any,
    Unsupported("matching by IP address is not supported yet; match by principals or namespaces"),
]
BY_HOST = Annotated[
    Any,
    Unsupported(
        "matching by host is not supported yet; a sidecar's inbound side serves one workload"
    ),
]


def _one_wildcard(value: str, what: str, example: str) -> str:
    """The text around Istio's only wildcard: '*' alone, or at the start (suffix) or end (prefix)."""
    if value == "*":
        return ""
    inner = value[1:] if value.startswith("*") else value.removesuffix("*")
    if "*" in inner:
        raise ValueError(
            f"{value!r}: '*' is allowed only alone, at the start or at the end of a {what} (e.g. {example})"
        )
    return inner


_PRINCIPAL = re.compile(r"^[^/\s]+/ns/[^/\s]+/sa/[^/\s]+$")
_PRINCIPAL_PART = re.compile(r"^[^\s]*$")


def principal(value: str) -> str:
    if value.startswith("spiffe://"):
        raise ValueError(
            f"{value!r}: write principals without 'spiffe://' (it is added), e.g. {value[9:]!r}"
        )
    inner = _one_wildcard(value, "principal", "cluster.local/ns/shop/* or */sa/reviews")
    if value == "*" or (inner != value and inner and _PRINCIPAL_PART.match(inner)):
        return value
    if not _PRINCIPAL.match(value):
        raise ValueError(
            f"{value!r} is not a principal: write TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT "
            "(e.g. cluster.local/ns/default/sa/reviews), or '*' for any authenticated peer"
        )
    return value


_NAMESPACE_TEXT = re.compile(r"^[a-z0-9-]+$")


def namespace(value: str) -> str:
    inner = _one_wildcard(value, "namespace", "team-* or *-prod")
    if value != "*" and not _NAMESPACE_TEXT.match(inner):
        raise ValueError(f"{value!r} is not a namespace: lowercase letters, digits and '-'")
    return value


def path(value: str) -> str:
    if "{*}" in value or "{**}" in value:
        raise ValueError(f"{value!r}: path templates ({{*}}, {{**}}) are not supported yet")
    inner = _one_wildcard(value, "path", "/api/* or */info")
    if value != "*" and not value.startswith(("/", "*")):
        raise ValueError(f"{value!r}: a path starts with '/' (or '*' for a suffix match)")
    if "?" in inner or "#" in inner:
        raise ValueError(f"{value!r}: paths are matched without the query string; remove '?...'")
    if any(ch.isspace() for ch in value) or not inner and value != "*":
        raise ValueError(f"{value!r} is not a path")
    return value


_METHOD = re.compile(r"^[A-Za-z-]+$")


def method(value: str) -> str:
    inner = _one_wildcard(value, "method", "P* for POST, PUT and PATCH")
    if value != "*" and not _METHOD.match(inner):
        raise ValueError(f"{value!r} is not an HTTP method")
    if inner != inner.upper():
        raise ValueError(
            f"{value!r}: methods are matched case-sensitively; write {value.upper()!r}"
        )
    return value


def port(value: str) -> str:
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        raise ValueError(f"{value!r} is not a port number in [1, 65535]")
    return value


def header_value(value: str) -> str:
    _one_wildcard(value, "value", "Bearer *")
    return value


Principal = Annotated[str, AfterValidator(principal)]
Namespace = Annotated[str, AfterValidator(namespace)]
Path = Annotated[str, AfterValidator(path)]
Method = Annotated[str, AfterValidator(method)]
PortText = Annotated[str, AfterValidator(port)]

_HEADER_KEY = re.compile(r"^request\.headers\[([^\]]*)\]$")
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# `when` keys that compile, by what they match; and Istio's others, refused by name.
CONDITION_KEYS = (
    "request.headers[NAME]",
    "source.principal",
    "source.namespace",
    "destination.port",
)
_LATER_KEYS = {
    "source.ip": "matching by IP address is not supported yet",
    "remote.ip": "matching by IP address is not supported yet",
    "destination.ip": "matching by IP address is not supported yet",
    "connection.sni": "matching by SNI is not supported yet",
    "request.auth.principal": "request principals need RequestAuthentication (JWT), which is not supported yet",
    "request.auth.audiences": "JWT claims need RequestAuthentication, which is not supported yet",
    "request.auth.presenter": "JWT claims need RequestAuthentication, which is not supported yet",
}


def header_name(key: str) -> str | None:
    """`request.headers[X-User]` → 'x-user' (header names are case-insensitive); None otherwise."""
    found = _HEADER_KEY.match(key)
    return found.group(1).lower() if found else None


def condition_key(key: str) -> str:
    found = _HEADER_KEY.match(key)
    if found:
        if not _TOKEN.match(found.group(1)) or found.group(1).startswith(":"):
            raise ValueError(f"{key!r}: {found.group(1)!r} is not a header name")
        return key
    if key in CONDITION_KEYS:
        return key
    if key in _LATER_KEYS or key.startswith(("request.auth.claims[", "experimental.")):
        reason = _LATER_KEYS.get(key, "this condition key is not supported yet")
        raise ValueError(f"{key!r}: {reason}")
    raise ValueError(f"unknown condition key {key!r}; known keys: {', '.join(CONDITION_KEYS)}")


def _action(value: str) -> str:
    if value in ("ALLOW", "DENY"):
        return value
    if value == "AUDIT":
        raise ValueError(
            "action AUDIT is not supported yet (it needs an audit log sink); use ALLOW or DENY"
        )
    if value == "CUSTOM":
        raise ValueError(
            "action CUSTOM (an external authorizer) is not supported yet; use ALLOW or DENY"
        )
    raise ValueError(f"{value!r} is not an action; use ALLOW or DENY")


class Source(MeshModel):
    principals: list[Principal] | None = None
    not_principals: list[Principal] | None = None
    namespaces: list[Namespace] | None = None
    not_namespaces: list[Namespace] | None = None
    request_principals: NEEDS_JWT = None
    not_request_principals: NEEDS_JWT = None
    ip_blocks: BY_ADDRESS = None
    not_ip_blocks: BY_ADDRESS = None
    remote_ip_blocks: BY_ADDRESS = None
    not_remote_ip_blocks: BY_ADDRESS = None


class Operation(MeshModel):
    # Istio writes ports as strings ("8080"), as its schema does.
    ports: list[PortText] | None = None
    not_ports: list[PortText] | None = None
    methods: list[Method] | None = None
    not_methods: list[Method] | None = None
    paths: list[Path] | None = None
    not_paths: list[Path] | None = None
    hosts: BY_HOST = None
    not_hosts: BY_HOST = None


class Condition(MeshModel):
    key: Annotated[str, AfterValidator(condition_key)]
    values: list[str] | None = None
    not_values: list[str] | None = None


class From(MeshModel):
    source: Source


class To(MeshModel):
    operation: Operation


class Rule(MeshModel):
    from_: list[From] | None = Field(default=None, alias="from")
    to: list[To] | None = None
    when: list[Condition] | None = None


class AuthorizationPolicySpec(MeshModel):
    selector: WorkloadSelector | None = None
    # No rules: an ALLOW policy denies every request (Istio's allow-nothing); DENY denies none.
    rules: list[Rule] | None = None
    action: Annotated[str, AfterValidator(_action)] = "ALLOW"
    provider: Annotated[
        Any, Unsupported("action CUSTOM (an external authorizer) is not supported yet")
    ] = None
    target_ref: TargetRefUnsupported = None
    target_refs: TargetRefsUnsupported = None


_SOURCE_FIELDS = ("principals", "notPrincipals", "namespaces", "notNamespaces")
_OPERATION_FIELDS = ("ports", "notPorts", "methods", "notMethods", "paths", "notPaths")


def problems(spec: AuthorizationPolicySpec) -> Iterator[tuple[str, str]]:
    """What one field's type cannot say: empty sources and operations, condition values by key."""
    for r, rule in enumerate(spec.rules or []):
        at = f"spec.rules[{r}]"
        for f, source in enumerate(rule.from_ or []):
            if not source.source.model_fields_set:
                yield f"{at}.from[{f}].source", f"is empty; set one of {', '.join(_SOURCE_FIELDS)}"
        for t, target in enumerate(rule.to or []):
            if not target.operation.model_fields_set:
                yield (
                    f"{at}.to[{t}].operation",
                    f"is empty; set one of {', '.join(_OPERATION_FIELDS)}",
                )
        for w, condition in enumerate(rule.when or []):
            here = f"{at}.when[{w}]"
            if not condition.values and not condition.not_values:
                yield here, "needs values or notValues"
            check = _VALUE_CHECKS.get(condition.key, header_value)
            for name, values in (("values", condition.values), ("notValues", condition.not_values)):
                for v, value in enumerate(values or []):
                    try:
                        check(value)
                    except ValueError as error:
                        yield f"{here}.{name}[{v}]", str(error)


_VALUE_CHECKS = {
    "source.principal": principal,
    "source.namespace": namespace,
    "destination.port": port,
}
