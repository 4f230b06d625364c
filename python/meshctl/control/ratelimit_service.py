"""`envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit` on the control plane's xDS port:
the global RateLimit rules counted once for the whole mesh (ratelimit_counters), for meshctl
sidecars and Envoys alike.

Who may ask: as for ADS, a client certificate from the mesh's CA (a sidecar) or the API token
(an operator's tool); anyone else could spend every service's limit.

meshctl's batched quota: a call with request metadata `x-meshctl-quota: 1` may get, per admitted
descriptor, `quota {requests: N, valid_until: T}`: N further requests already counted, which the
sidecar admits without calling until T; a descriptor refused (OVER_LIMIT) gets `quota {requests: 0,
valid_until: T}`, which the sidecar refuses on its own until T. Without that metadata no quota is ever granted (a real
Envoy ignores it and calls per request: a grant would only waste the limit).

The counters are this plane's memory (GlobalCounters) or Redis shared by several planes
(ratelimit_redis.RedisCounters). When Redis does not answer, the call fails with UNAVAILABLE (not
OK): the sidecar then applies its own failure mode, failing open (counted as
ratelimit.failure_mode_allowed) unless its RateLimit asked for failureModeDeny, exactly as if the
service itself were unreachable.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import trio
from envoy.service.ratelimit.v3 import rls_pb2
from google.protobuf.message import DecodeError
from pydantic import ValidationError

from meshctl.control.compiler_ratelimit import DESCRIPTOR_KEY
from meshctl.control.compiler_ratelimit_global import DOMAIN, rule_name
from meshctl.control.identity_authority import IdentityAuthority
from meshctl.control.identity_grpc import peer_identity
from meshctl.control.ratelimit_counters import CountersUnavailable, GlobalRule, Verdict
from meshctl.control.ratelimit_status import RateLimitStatusExtension
from meshctl.control.store import Store, StoreError
from meshctl.grpc import GrpcError, StatusCode
from meshctl.grpc.server import Handler, ServerStream
from meshctl.resources.rate_limit import UNIT_SECONDS, RateLimitResponse, RateLimitSpec

log = logging.getLogger("meshctl.control.ratelimit")

SHOULD_RATE_LIMIT_METHOD = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"
QUOTA_METADATA = "x-meshctl-quota"
# A request names at most this many descriptors (a route has one action per rule; 64 rules).
MAX_DESCRIPTORS = 256
_UNITS = {1: rls_pb2.RateLimitResponse.RateLimit.SECOND, 60: rls_pb2.RateLimitResponse.RateLimit.MINUTE,
          3600: rls_pb2.RateLimitResponse.RateLimit.HOUR}  # fmt: skip

_UNIT_NAMES = {seconds: unit for unit, seconds in UNIT_SECONDS.items()}
Response = rls_pb2.RateLimitResponse


def global_rules(resources: Iterable[Any]) -> list[GlobalRule]:
    """Every `scope: global` rule of the stored RateLimits (a StoredResource or a plain body)."""
    rules = []
    for resource in resources:
        body = getattr(resource, "body", resource)
        if body.get("kind") != "RateLimit":
            continue
        metadata = body.get("metadata", {})
        namespace, name = metadata.get("namespace", "default"), metadata.get("name", "")
        try:
            spec = RateLimitSpec.model_validate(body.get("spec", {}))
        except ValidationError as error:  # stored before a stricter schema: skip, say so
            log.warning("RateLimit %s/%s is not valid any more, its rules are not served: %s", namespace, name, error)
            continue
        for index, rule in enumerate(spec.rules):
            if rule.scope != "global":
                continue
            response = rule.response or RateLimitResponse()
            rules.append(GlobalRule(
                name=rule_name(namespace, name, index), requests=rule.limit.requests,
                unit_seconds=UNIT_SECONDS[rule.limit.unit], burst=rule.limit.burst or 0,
                shadow=rule.shadow, headers=tuple(sorted(response.headers.items())),
            ))  # fmt: skip
    return rules


class Counters(Protocol):
    """What the service and the API need of a counter store (GlobalCounters, RedisCounters)."""

    counters_capped: int

    def set_rules(self, rules: Iterable[GlobalRule]) -> None: ...
    def rule(self, name: str) -> GlobalRule | None: ...
    def last_minute(self, name: str, now: float) -> tuple[int, int]: ...
    async def decide_async(
        self, names: Sequence[str | None], hits: int, now: float, caller: str = "", want_quota: bool = False
    ) -> list[Verdict]: ...


async def follow_rules(
    store: Store, counters: Counters, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Keep `counters`' rules those of the store, from now on (one reload per store change)."""
    started = False
    while True:
        try:
            revision, resources = await store.snapshot()
        except StoreError as error:
            log.warning("cannot read the store for the global rate limits: %s; retrying", error)
            await trio.sleep(1.0)
            continue
        counters.set_rules(global_rules(resources))
        if not started:
            task_status.started()
            started = True
        await store.wait_for_change(revision)


def descriptor_rule(descriptor: Any) -> str | None:
    """The rule a descriptor names: exactly the one entry meshctl's compiled actions produce."""
    entries = descriptor.entries
    if len(entries) == 1 and entries[0].key == DESCRIPTOR_KEY:
        return entries[0].value
    return None


class RateLimitService:
    """The ShouldRateLimit handler over `counters`; `clock` is wall time (windows align to it)."""

    def __init__(
        self, counters: Counters, authority: IdentityAuthority | None, api_token: str | None,
        clock: Callable[[], float] = time.time,
    ) -> None:  # fmt: skip
        self.counters = counters
        self.authority = authority
        self.api_token = api_token
        self.clock = clock
        self.refused = 0  # calls refused for want of credentials

    def handlers(self) -> dict[str, Handler]:
        return {SHOULD_RATE_LIMIT_METHOD: self.should_rate_limit}

    async def should_rate_limit(self, stream: ServerStream) -> None:
        raw = await stream.receive_message()
        if raw is None:
            raise GrpcError(StatusCode.INVALID_ARGUMENT, "the call carried no RateLimitRequest")
        caller = self._caller(stream)
        try:
            request = rls_pb2.RateLimitRequest.FromString(raw)
        except DecodeError as error:
            raise GrpcError(StatusCode.INVALID_ARGUMENT, f"not a RateLimitRequest: {error}") from None
        if len(request.descriptors) > MAX_DESCRIPTORS:
            raise GrpcError(StatusCode.INVALID_ARGUMENT,
                            f"descriptors: {len(request.descriptors)}; at most {MAX_DESCRIPTORS}")  # fmt: skip
        # Grants are sized per sidecar: replicas share an identity, each has its own connection.
        caller = f"{caller} {stream.peer}"
        answer = await self.answer(request, caller, stream.metadata(QUOTA_METADATA) == "1")
        await stream.send_message(answer.SerializeToString())

    async def answer(self, request: Any, caller: str, want_quota: bool) -> Any:
        """The RateLimitResponse: OK for another domain or an unknown descriptor (Envoy's reference
        service answers OK where no limit matches)."""
        if request.domain != DOMAIN:
            names: list[str | None] = [None] * len(request.descriptors)
        else:
            names = [descriptor_rule(d) for d in request.descriptors]
        capped = self.counters.counters_capped
        try:
            verdicts = await self.counters.decide_async(names, request.hits_addend, self.clock(), caller, want_quota)
        except CountersUnavailable as error:
            raise GrpcError(StatusCode.UNAVAILABLE, f"the rate limit counters are unreachable: {error}") from None
        if self.counters.counters_capped > capped and capped == 0:
            log.warning("global rate limits: %d live counters, the most kept; rules without one are "
                        "not limited (counted in counters_capped)", self.counters.max_counters)  # fmt: skip
        response = Response(overall_code=Response.OK)
        for verdict in verdicts:
            response.statuses.append(_status(verdict))
        refusing = [v for v in verdicts if not v.ok]
        if refusing:
            response.overall_code = Response.OVER_LIMIT
            for key, value in refusing[0].rule.headers if refusing[0].rule else ():
                response.response_headers_to_add.add(key=key, value=value)
        return response

    def _caller(self, stream: ServerStream) -> str:
        """Who is calling (a SPIFFE ID, or "operator"), as ADS checks it; else UNAUTHENTICATED."""
        if self.authority is not None:
            found = peer_identity(stream, self.authority)
            if found is not None:
                return str(found[0])
        scheme, _, presented = (stream.metadata("authorization") or "").partition(" ")
        if self.api_token is not None and scheme.lower() == "bearer" and hmac.compare_digest(
            presented.strip().encode(), self.api_token.encode()
        ):
            return "operator"
        self.refused += 1
        log.warning("refused ShouldRateLimit to %s: no client certificate and no API token", stream.peer)
        raise GrpcError(StatusCode.UNAUTHENTICATED,
                        "ShouldRateLimit needs a client certificate from the mesh's CA or "
                        "'authorization: Bearer <API token>'")  # fmt: skip


def _status(verdict: Verdict) -> Any:
    status = Response.DescriptorStatus(code=Response.OK if verdict.ok else Response.OVER_LIMIT)
    rule = verdict.rule
    if rule is None:
        return status
    status.current_limit.name = rule.name
    status.current_limit.requests_per_unit = verdict.limit
    status.current_limit.unit = _UNITS[rule.unit_seconds]
    status.limit_remaining = verdict.remaining
    status.duration_until_reset.FromNanoseconds(int(verdict.reset_in * 1e9))
    if verdict.quota is not None:
        status.quota.requests = verdict.quota.requests  # 0 on OVER_LIMIT: refused until valid_until
        status.quota.valid_until.FromNanoseconds(int(verdict.quota.valid_until * 1e9))
    return status


class RateLimitStatus(RateLimitStatusExtension):
    """An API extension: a RateLimit's status shows, per global rule, the requests the service
    allowed and limited in the last minute (shadow rules: what they would have done)."""

    def __init__(self, counters: Counters, clock: Callable[[], float] = time.time) -> None:
        self.counters = counters
        self.clock = clock

    def rules_status(self, namespace: str, name: str, rules: list[Any]) -> dict[str, Any] | None:
        shown = []
        for index, rule in enumerate(rules):
            if not isinstance(rule, dict) or rule.get("scope") != "global":
                continue
            served = self.counters.rule(rule_name(namespace, name, index))
            allowed, limited = self.counters.last_minute(rule_name(namespace, name, index), self.clock())
            # What the service counts against now (the store may be a moment ahead of it).
            serving = None if served is None else f"{served.requests} per {_UNIT_NAMES[served.unit_seconds]}"
            shown.append({"rule": index, "serving": serving,
                          "allowedLastMinute": allowed, "limitedLastMinute": limited})  # fmt: skip
        return {"globalRules": shown} if shown else None
