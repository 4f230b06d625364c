"""The ADS server: envoy.service.discovery.v3.AggregatedDiscoveryService, state of the world, over
meshctl.grpc. Versions, nonces, ACK/NACK and the CDS → EDS → LDS → RDS order follow Envoy's xDS
protocol."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import trio
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest, DiscoveryResponse
from google.protobuf.message import DecodeError

from meshctl.control import resource_types
from meshctl.control.snapshot import SnapshotCache, TypeResources
from meshctl.grpc import GrpcError, Limits, StatusCode, serve_grpc
from meshctl.grpc.server import Handler, ServerStream, SslContextSource

log = logging.getLogger(__name__)

ADS_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"

# A full mesh config (thousands of routes) can be several MiB in one response.
ADS_LIMITS = Limits(max_message_bytes=64 * 1024 * 1024)


@dataclass
class _Subscription:
    """One type on one stream: what the client asked for and what we last sent it."""

    names: frozenset[str] = frozenset()
    names_changed: bool = True  # the client has asked for a set we have not answered yet
    sent: TypeResources | None = None
    nonce: str = ""
    version: str = ""
    awaiting_answer: bool = False  # sent, and neither ACKed nor NACKed yet


@dataclass
class AdsStatistics:
    streams_active: int = 0
    streams_total: int = 0
    responses_sent: int = 0
    acks: int = 0
    nacks: int = 0
    stale_requests: int = 0
    unsupported_type_requests: int = 0


class _AdsStream:
    """One client's ADS stream: a receiving task records requests and a sending task answers."""

    def __init__(self, cache: SnapshotCache, grpc_stream: ServerStream, statistics: AdsStatistics) -> None:
        self._cache = cache
        self._grpc = grpc_stream
        self._statistics = statistics
        self._node_id: str | None = None
        self._subscriptions: dict[str, _Subscription] = {}
        self._nonces = itertools.count(1)
        self._wakeup = trio.Event()
        self._failure: GrpcError | None = None

    async def run(self) -> None:
        stop_watching = self._cache.watch(self._wake)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._until_first_ends, self._send_responses, nursery.cancel_scope)
                await self._until_first_ends(self._receive_requests, nursery.cancel_scope)
        finally:
            stop_watching()
        if self._failure is not None:
            raise self._failure

    async def _until_first_ends(self, loop, scope: trio.CancelScope) -> None:
        # Either loop ending ends the stream; a GrpcError becomes the call's status.
        try:
            await loop()
        except GrpcError as error:
            self._failure = self._failure or error
        finally:
            scope.cancel()

    def _wake(self) -> None:
        self._wakeup.set()

    async def _receive_requests(self) -> None:
        while (raw := await self._grpc.receive_message()) is not None:
            try:
                request = DiscoveryRequest.FromString(raw)
            except DecodeError as error:
                raise GrpcError(StatusCode.INVALID_ARGUMENT, f"not a DiscoveryRequest: {error}") from None
            self._on_request(request)
            self._wake()

    def _on_request(self, request: DiscoveryRequest) -> None:
        if self._node_id is None:
            if not request.node.id:
                raise GrpcError(StatusCode.INVALID_ARGUMENT, "the first DiscoveryRequest must carry node.id")
            self._node_id = request.node.id
        type_url = request.type_url
        if type_url not in resource_types.MESSAGE_TYPES:
            # E.g. secrets (SDS) over ADS: this server has none, so the request stays unanswered.
            self._statistics.unsupported_type_requests += 1
            log.debug("node %s asked for unsupported type %s", self._node_id, type_url)
            return
        subscription = self._subscriptions.get(type_url)
        if subscription is None:
            # The first request of a type on a stream is a subscription whatever nonce it carries
            # (a client may resend the one from its previous stream).
            subscription = self._subscriptions[type_url] = _Subscription()
        elif request.response_nonce != subscription.nonce:
            # Answers a response that a newer one has replaced: the client will answer that one
            # too, so this request says nothing current (xDS: ignore stale nonces).
            self._statistics.stale_requests += 1
            return
        elif subscription.awaiting_answer:
            subscription.awaiting_answer = False
            if request.HasField("error_detail"):
                self._statistics.nacks += 1
                self._cache.acks.record_nack(
                    self._node_id, type_url, subscription.version, request.error_detail.message
                )
                log.info(
                    "node %s rejected %s version %s: %s", self._node_id,
                    resource_types.SHORT_NAMES[type_url], subscription.version, request.error_detail.message,
                )
            else:
                self._statistics.acks += 1
                self._cache.acks.record_ack(self._node_id, type_url, subscription.version)
        names = frozenset(request.resource_names)
        if type_url in resource_types.WILDCARD_TYPES and names <= {"*"}:
            names = frozenset()  # everything (an empty list and "*" both mean that)
        if names != subscription.names:
            subscription.names = names
            subscription.names_changed = True

    async def _send_responses(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            snapshot = self._cache.snapshot_for(self._node_id) if self._node_id else None
            if snapshot is None:
                continue
            for type_url in resource_types.ORDER:
                subscription = self._subscriptions.get(type_url)
                if subscription is None:
                    continue
                resources = snapshot.of_type(type_url)
                if resources is not subscription.sent or subscription.names_changed:
                    await self._send(type_url, subscription, resources)
                if subscription.awaiting_answer:
                    # Make before break: later types wait until the client has taken this one
                    # (its answer wakes us again).
                    break

    async def _send(self, type_url: str, subscription: _Subscription, resources: TypeResources) -> None:
        if type_url in resource_types.WILDCARD_TYPES and not subscription.names:
            chosen = None  # all of them
        else:
            chosen = tuple(name for name in sorted(subscription.names) if name in resources.items)
        nonce = str(next(self._nonces))
        # The resources are encoded once per version for every stream (a big config is most of
        # the response); the fields of this stream's own are encoded beside them.
        response = DiscoveryResponse(version_info=resources.version, type_url=type_url, nonce=nonce)
        payload = response.SerializeToString() + resources.encoded_resources(chosen)
        subscription.sent = resources
        subscription.names_changed = False
        subscription.nonce = nonce
        subscription.version = resources.version
        subscription.awaiting_answer = True
        await self._grpc.send_message(payload)
        self._statistics.responses_sent += 1


class AdsServer:
    """The gRPC handler for StreamAggregatedResources over one SnapshotCache."""

    def __init__(self, cache: SnapshotCache) -> None:
        self.cache = cache
        self._statistics = AdsStatistics()

    def statistics(self) -> AdsStatistics:
        return AdsStatistics(**vars(self._statistics))

    async def stream_aggregated_resources(self, grpc_stream: ServerStream) -> None:
        self._statistics.streams_active += 1
        self._statistics.streams_total += 1
        try:
            await _AdsStream(self.cache, grpc_stream, self._statistics).run()
        finally:
            self._statistics.streams_active -= 1


def parse_address(address: str | tuple[str, int]) -> tuple[str, int]:
    """("host", port) from "host:port", "[v6]:port" or a tuple; ValueError says what is wrong."""
    if isinstance(address, tuple):
        return address
    host, separator, port = address.rpartition(":")
    if not separator or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f'"{address}" is not HOST:PORT')
    return host.strip("[]") or "0.0.0.0", int(port)


async def serve_ads(
    address: str | tuple[str, int],
    cache: SnapshotCache,
    *,
    limits: Limits = ADS_LIMITS,
    server: AdsServer | None = None,
    more_handlers: Mapping[str, Handler] | None = None,
    ssl_context: SslContextSource | None = None,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ADS from `cache` on `address` until cancelled; task_status.started gets the bound
    (host, port). Pass `server` to read its statistics(); `more_handlers` are further gRPC
    methods on the same port (the CA); with `ssl_context` the port is TLS."""
    host, port = parse_address(address)
    server = server or AdsServer(cache)
    handlers = {ADS_METHOD: server.stream_aggregated_resources, **(more_handlers or {})}
    await serve_grpc(handlers, host, port, limits=limits, ssl_context=ssl_context, task_status=task_status)
