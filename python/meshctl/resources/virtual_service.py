"""VirtualService: how requests to a host are matched, split across subsets, rewritten or redirected."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, model_validator

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


class Percent(MeshModel):
    """Istio's Percent: a share of requests in [0, 100], decimals allowed (0.1 is one in a thousand)."""

    # Istio writes whole numbers as integers too; strict mode would refuse 50 for a float.
    value: Annotated[float | int, Field(ge=0, le=100)]


# gRPC's status names as Istio accepts them for fault.abort.grpcStatus, with their codes.
GRPC_STATUS_CODES = {
    "OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5, "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9, "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12,
    "INTERNAL": 13, "UNAVAILABLE": 14, "DATA_LOSS": 15, "UNAUTHENTICATED": 16,
}  # fmt: skip


def _grpc_status(name: str) -> str:
    if name not in GRPC_STATUS_CODES:
        raise ValueError(f"{name!r} is not a gRPC status; use one of {', '.join(GRPC_STATUS_CODES)}")
    return name


class FaultDelay(MeshModel):
    fixed_delay: Duration | None = None
    percentage: Percent | None = None
    # Deprecated by Istio in favour of percentage; an integer share.
    percent: Annotated[int, Field(ge=0, le=100)] | None = None
    exponential_delay: Later = None

    @model_validator(mode="after")
    def _delay_given(self) -> FaultDelay:
        if self.fixed_delay is None and self.exponential_delay is None:
            raise ValueError("a delay needs fixedDelay")
        if self.percentage is not None and self.percent is not None:
            raise ValueError("set percentage or the deprecated percent, not both")
        return self


class FaultAbort(MeshModel):
    # Istio's range; Envoy refuses anything outside [200, 600) as well.
    http_status: Annotated[int, Field(ge=200, le=599)] | None = None
    grpc_status: Annotated[str, AfterValidator(_grpc_status)] | None = None
    percentage: Percent | None = None
    http2_error: Later = None

    @model_validator(mode="after")
    def _one_error(self) -> FaultAbort:
        chosen = [n for n in ("http_status", "grpc_status", "http2_error") if getattr(self, n) is not None]
        if len(chosen) != 1:
            raise ValueError(f"an abort needs exactly one of httpStatus or grpcStatus (got {len(chosen)})")
        return self


class FaultInjection(MeshModel):
    delay: FaultDelay | None = None
    abort: FaultAbort | None = None

    @model_validator(mode="after")
    def _something(self) -> FaultInjection:
        if self.delay is None and self.abort is None:
            raise ValueError("a fault needs a delay or an abort")
        return self


class MirrorPolicy(MeshModel):
    destination: Destination
    # Omitted: every request is mirrored (Istio's default).
    percentage: Percent | None = None


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
    fault: FaultInjection | None = None
    mirror: Destination | None = None
    mirrors: list[MirrorPolicy] | None = None
    # Deprecated by Istio in favour of mirrorPercentage.
    mirror_percent: Annotated[int, Field(ge=0, le=100)] | None = None
    mirror_percentage: Percent | None = None
    cors_policy: Later = None


class VirtualServiceSpec(MeshModel):
    hosts: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1)
    # Only the implicit "mesh" gateway exists here; checked in validate.py.
    gateways: list[str] | None = None
    http: list[HttpRoute] = Field(min_length=1)
    tls: Later = None
    tcp: Later = None
    export_to: Later = None
