"""The sidecar agent's ADS client: keeps a meshctl Engine in step with the control plane over
state-of-the-world ADS, ACKing what the engine accepts and NACKing what it refuses."""

from __future__ import annotations

import inspect
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio
from envoy.config.core.v3.base_pb2 import Node
from envoy.service.discovery.v3 import ads_pb2
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest, DiscoveryResponse
from google.protobuf.message import DecodeError

from meshctl._core import ConfigError
from meshctl.agent import xds_references as refs
from meshctl.agent.backoff import Backoff
from meshctl.grpc import GrpcError, Limits, StatusCode, open_grpc_channel
from meshctl.grpc.client import ClientStream, GrpcChannel

if TYPE_CHECKING:
    from meshctl._core import Engine

log = logging.getLogger(__name__)

_SERVICE = ads_pb2.DESCRIPTOR.services_by_name["AggregatedDiscoveryService"]
ADS_METHOD = f"/{_SERVICE.full_name}/{_SERVICE.methods_by_name['StreamAggregatedResources'].name}"

# Listeners and clusters are subscribed as "everything"; their responses are the whole set, so a
# missing name means removal. Routes, endpoints and secrets are subscribed by the names those
# refer to (secrets: by both).
_WILDCARD = (refs.CLUSTER, refs.LISTENER)
_BY_NAME = {refs.CLUSTER: refs.ENDPOINT, refs.LISTENER: refs.ROUTE}  # who names whom

# A full mesh config (thousands of routes) can be several MiB in one response.
ADS_CLIENT_LIMITS = Limits(max_message_bytes=64 * 1024 * 1024)


@dataclass
class _TypeState:
    accepted_version: str = ""
    nonce: str = ""
    names: frozenset[str] = frozenset()  # subscribed names (EDS, RDS only)
    applied: dict[str, bytes] = field(default_factory=dict)  # what the engine holds, by name
    messages: dict[str, object] = field(default_factory=dict)  # decoded `applied`, for references
    error: str | None = None  # the engine's reason for the last NACK, until a version is accepted


@dataclass
class AdsClientStatistics:
    connects: int = 0
    connect_failures: int = 0
    responses: int = 0
    acks: int = 0
    nacks: int = 0


class AdsClient:
    """Feeds xDS from `address` into `engine`; `run()` until cancelled, reconnecting with backoff.

    While the control plane is away the engine keeps serving the last config it accepted.
    """

    def __init__(
        self,
        engine: Engine,
        address: tuple[str, int],
        node_id: str,
        *,
        node_cluster: str = "",
        backoff: Backoff | None = None,
        limits: Limits = ADS_CLIENT_LIMITS,
        keepalive_interval: float = 15.0,
        keepalive_timeout: float = 10.0,
        tls: Callable[[], ssl.SSLContext] | None = None,
        pinned_secrets: frozenset[str] = frozenset(),
        on_secret: Callable[[str, object], Awaitable[None] | None] | None = None,
    ) -> None:
        if not node_id:
            raise ValueError("an ADS client needs a node id")
        self._engine = engine
        self._address = address
        self._node = Node(id=node_id, cluster=node_cluster, user_agent_name="meshctl")
        self._backoff = backoff or Backoff()
        self._limits = limits
        self._keepalive = (keepalive_interval, keepalive_timeout)
        self._types = {type_url: _TypeState() for type_url in refs.MESSAGE_TYPES}
        self._statistics = AdsClientStatistics()
        # Called at every connect, so a renewed client certificate is used by the next connection
        # (the stream in progress keeps the one it authenticated with).
        self._tls = tls
        # Secrets asked for from the start (the trust bundle), before anything refers to them, so
        # a cluster or listener that needs one never waits for a second round trip.
        self._pinned_secrets = frozenset(pinned_secrets) - {refs.WORKLOAD_SECRET}
        self._types[refs.SECRET].names = self._pinned_secrets
        self._on_secret = on_secret
        self.connected = False
        self.channel: GrpcChannel | None = None  # while connected; registration shares it

    def statistics(self) -> AdsClientStatistics:
        return AdsClientStatistics(**vars(self._statistics))

    def status(self) -> dict[str, dict[str, object]]:
        """Per type URL: the version the engine runs, the last NACK's reason, the names held."""
        return {
            type_url: {"version": state.accepted_version, "error": state.error, "names": sorted(state.applied)}
            for type_url, state in self._types.items()
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        host, port = self._address
        while True:
            try:
                tls = {"ssl_context": self._tls()} if self._tls is not None else {}
                async with open_grpc_channel(
                    host, port, limits=self._limits,
                    keepalive_interval=self._keepalive[0], keepalive_timeout=self._keepalive[1],
                    **tls,
                ) as channel:
                    self._statistics.connects += 1
                    self.channel = channel
                    async with channel.open_stream(ADS_METHOD) as stream:
                        await self._follow(stream)
            except GrpcError as error:
                if not self.connected:
                    self._statistics.connect_failures += 1
                log.warning("ADS to %s:%s: %s", host, port, error)
            finally:
                self.connected = False
                self.channel = None
            delay = self._backoff.next_delay()
            log.info("ADS: reconnecting in %.2fs; the engine keeps its current config", delay)
            await trio.sleep(delay)

    async def _follow(self, stream: ClientStream) -> None:
        for state in self._types.values():
            state.nonce = ""  # nonces belong to the stream that carried them
        if self._types[refs.SECRET].names:
            await self._request(stream, refs.SECRET)  # make-before-break: trust before users
        await self._request(stream, refs.CLUSTER)
        await self._request(stream, refs.LISTENER)
        for type_url in (refs.ENDPOINT, refs.ROUTE):
            if self._types[type_url].names:
                await self._request(stream, type_url)
        while (raw := await stream.receive_message()) is not None:
            try:
                response = DiscoveryResponse.FromString(raw)
            except DecodeError as error:
                raise GrpcError(StatusCode.INTERNAL, f"not a DiscoveryResponse: {error}") from None
            if not self.connected:
                self.connected = True
                self._backoff.reset()  # this control plane works; a later loss starts from base
            await self._on_response(stream, response)
        raise GrpcError(StatusCode.UNAVAILABLE, "the control plane ended the ADS stream")

    async def _on_response(self, stream: ClientStream, response: DiscoveryResponse) -> None:
        self._statistics.responses += 1
        type_url = response.type_url
        state = self._types.get(type_url)
        if state is None:
            log.warning("ADS: ignoring a response for unrequested type %s", type_url)
            return
        state.nonce = response.nonce
        try:
            decoded = refs.decode_resources(type_url, response.resources)
            if type_url == refs.SECRET and decoded.pop(refs.WORKLOAD_SECRET, None) is not None:
                # The workload's key is made here and never leaves; a plane cannot replace it.
                log.warning('ADS: ignoring a Secret "%s" from the control plane', refs.WORKLOAD_SECRET)
            await self._apply(type_url, state, decoded)
        except (ConfigError, refs.ResourceError) as error:
            reason = str(error)
            self._statistics.nacks += 1
            state.error = reason
            log.warning("ADS: rejected %s version %s: %s", type_url, response.version_info, reason)
            await self._request(stream, type_url, error=reason)
            return
        state.accepted_version = response.version_info
        state.error = None
        self._statistics.acks += 1
        await self._request(stream, type_url)
        if type_url == refs.SECRET and self._on_secret is not None:
            for name, (_, message) in decoded.items():
                outcome = self._on_secret(name, message)
                if inspect.isawaitable(outcome):
                    await outcome
        if type_url in _BY_NAME:
            await self._follow_references(stream, type_url, state)

    async def _apply(self, type_url: str, state: _TypeState, decoded: dict[str, tuple[bytes, object]]) -> None:
        # Only what changed goes to the engine: a resent, identical resource must not disturb
        # the listeners and pools built from it.
        changed = [raw for name, (raw, _) in decoded.items() if state.applied.get(name) != raw]
        if changed:
            await trio.to_thread.run_sync(self._engine.apply, type_url, changed)
        if type_url in _WILDCARD:
            gone = [name for name in state.applied if name not in decoded]
            if gone:
                await trio.to_thread.run_sync(self._engine.remove, type_url, gone)
            state.applied, state.messages = {}, {}
        for name, (raw, message) in decoded.items():
            state.applied[name] = raw
            state.messages[name] = message

    async def _follow_references(self, stream: ClientStream, type_url: str, state: _TypeState) -> None:
        """Subscribe to the endpoints, routes and secrets the accepted clusters and listeners name."""
        messages = state.messages.values()
        names = refs.eds_names(messages) if type_url == refs.CLUSTER else refs.rds_names(messages)
        await self._subscribe(stream, _BY_NAME[type_url], names)
        secrets = refs.sds_names(
            self._types[refs.CLUSTER].messages.values(), self._types[refs.LISTENER].messages.values()
        )
        await self._subscribe(stream, refs.SECRET, secrets | self._pinned_secrets)

    async def _subscribe(self, stream: ClientStream, referred_type: str, names: frozenset[str]) -> None:
        referred = self._types[referred_type]
        if names == referred.names:
            return
        dropped = [name for name in referred.applied if name not in names]
        referred.names = names
        if dropped:
            # Nothing refers to them any more (as Envoy does when it unsubscribes).
            await trio.to_thread.run_sync(self._engine.remove, referred_type, dropped)
            for name in dropped:
                referred.applied.pop(name, None)
                referred.messages.pop(name, None)
        await self._request(stream, referred_type)

    async def _request(self, stream: ClientStream, type_url: str, *, error: str | None = None) -> None:
        state = self._types[type_url]
        request = DiscoveryRequest(
            version_info=state.accepted_version,
            node=self._node,
            resource_names=[] if type_url in _WILDCARD else sorted(state.names),
            type_url=type_url,
            response_nonce=state.nonce,
        )
        if error is not None:
            request.error_detail.code = StatusCode.INVALID_ARGUMENT
            request.error_detail.message = error
        await stream.send_message(request.SerializeToString())
