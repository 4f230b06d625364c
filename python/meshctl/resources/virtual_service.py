"""VirtualService: how requests to a host are matched, split across subsets, rewritten or redirected."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field

from meshctl.resources.common import Duration, Headers, MeshModel, Port, StringMatch
from meshctl.resources.support import UNSUPPORTED

Later = Annotated[Any, UNSUPPORTED]


class PortSelector(MeshModel):
    number: Port


class Destination(MeshModel):
    host: str = Field(min_length=1)
    subset: str | None = None
    port: PortSelector | None = None


class RouteDestination(MeshModel):
    destination: Destination
    # Omitted means 0 when there are several destinations, all traffic when there is one.
    weight: Annotated[int, Field(ge=0, le=100)] | None = None
    headers: Later = None


class MatchRequest(MeshModel):
    name: str | None = None
    uri: StringMatch | None = None
    method: StringMatch | None = None
    headers: dict[str, StringMatch] | None = None
    scheme: Later = None
    authority: Later = None
    port: Later = None
    source_labels: Later = None
    gateways: Later = None
    query_params: Later = None
    ignore_uri_case: Later = None
    without_headers: Later = None
    source_namespace: Later = None
    stat_prefix: Later = None


class Rewrite(MeshModel):
    uri: str | None = None
    authority: str | None = None
    uri_regex_rewrite: Later = None


class Redirect(MeshModel):
    uri: str | None = None
    authority: str | None = None
    redirect_code: Literal[301, 302, 303, 307, 308] | None = None
    scheme: Later = None
    port: Later = None
    derive_port: Later = None


# Envoy's retry conditions that meshctl's engine enforces (Istio accepts these and status codes).
RETRY_CONDITIONS = frozenset({
    "5xx", "gateway-error", "reset", "connect-failure", "refused-stream", "retriable-4xx",
    "retriable-status-codes", "cancelled", "deadline-exceeded", "internal", "resource-exhausted",
    "unavailable",
})  # fmt: skip
# Istio's own list beyond those: valid Istio, not enforced by meshctl's engine yet.
_RETRY_CONDITIONS_LATER = frozenset({
    "envoy-ratelimited", "retriable-headers", "reset-before-request", "http3-post-connect-failure",
})  # fmt: skip


def _retry_on(text: str) -> str:
    for token in (part.strip() for part in text.split(",")):
        if token.isdigit() and 100 <= int(token) <= 599:
            continue
        if token in _RETRY_CONDITIONS_LATER:
            raise ValueError(f"{token!r} is not supported by meshctl yet")
        if token not in RETRY_CONDITIONS:
            raise ValueError(
                f"{token!r} is not a retry condition: use {', '.join(sorted(RETRY_CONDITIONS))} "
                "or HTTP status codes"
            )
    return text


class Retries(MeshModel):
    attempts: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None
    per_try_timeout: Duration | None = None
    retry_on: Annotated[str, AfterValidator(_retry_on)] | None = None
    # meshctl has one locality, so this has nothing to choose between (accepted, no effect).
    retry_remote_localities: bool | None = None


class HttpRoute(MeshModel):
    name: str | None = None
    match: list[MatchRequest] | None = None
    route: list[RouteDestination] | None = None
    redirect: Redirect | None = None
    rewrite: Rewrite | None = None
    timeout: Duration | None = None
    retries: Retries | None = None
    headers: Headers | None = None
    direct_response: Later = None
    delegate: Later = None
    fault: Later = None
    mirror: Later = None
    mirrors: Later = None
    mirror_percent: Later = None
    mirror_percentage: Later = None
    cors_policy: Later = None


class VirtualServiceSpec(MeshModel):
    hosts: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1)
    # Only the implicit "mesh" gateway exists here; checked in validate.py.
    gateways: list[str] | None = None
    http: list[HttpRoute] = Field(min_length=1)
    tls: Later = None
    tcp: Later = None
    export_to: Later = None
