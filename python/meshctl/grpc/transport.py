"""One HTTP/2 connection on trio: h2 (sans-IO) state, a read loop that dispatches events to streams,
and writes that respect the peer's flow-control windows."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import trio

from meshctl.grpc.limits import Limits
from meshctl.grpc.status import GrpcError, StatusCode

if TYPE_CHECKING:
    from meshctl.grpc.stream import GrpcStream

log = logging.getLogger(__name__)

_READ_SIZE = 65536
# Bytes waiting to go out beyond which the read loop stops reading: a peer that sends frames we
# must answer (PING, SETTINGS) but never reads our answers cannot grow our buffers past this.
_OUTGOING_HIGH_WATER = 1024 * 1024
_DEFAULT_WINDOW = 65535  # RFC 9113's initial connection window, which SETTINGS cannot change

Headers = list[tuple[bytes, bytes]]
# Server side: called with (stream_id, request headers); returns the stream to register.
RequestCallback = Callable[[int, Headers], "GrpcStream"]


class Transport:
    """Owns the h2 state of one connection; every h2 call happens on the trio thread that runs it.

    Writes go through `flush()` under one lock so frames leave in the order h2 produced them.
    """

    def __init__(
        self,
        socket_stream: trio.abc.Stream,
        *,
        client_side: bool,
        limits: Limits,
        on_request: RequestCallback | None = None,
    ) -> None:
        self.limits = limits
        self._socket = socket_stream
        self._h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=client_side, header_encoding=None)
        )
        settings = {
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: limits.stream_window,
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_list_bytes,
        }
        if client_side:
            settings[h2.settings.SettingCodes.ENABLE_PUSH] = 0
        self._h2.local_settings = h2.settings.Settings(client=client_side, initial_values=settings)
        self._h2.decoder.max_header_list_size = limits.max_header_list_bytes
        self._on_request = on_request
        self._streams: dict[int, GrpcStream] = {}
        self._write_lock = trio.Lock()
        self._outgoing = bytearray()  # taken from h2, not yet written, in h2's order
        self._flush_wanted = trio.Event()
        self._window_opened = trio.Event()
        self._ping_acked = trio.Event()
        self._closed: GrpcError | None = None
        self._run_scope = trio.CancelScope()

    @property
    def closed(self) -> GrpcError | None:
        """Why the connection is closed, or None while it is open."""
        return self._closed

    async def start(self) -> None:
        """Send the connection preface and our SETTINGS, and widen the connection window."""
        self._h2.initiate_connection()
        extra = self.limits.connection_window - _DEFAULT_WINDOW
        if extra > 0:
            self._h2.increment_flow_control_window(extra)
        await self.flush()

    async def run(self) -> None:
        """Read and dispatch until the peer goes away, the connection fails, or `abort()`."""
        error = GrpcError(StatusCode.UNAVAILABLE, "connection aborted")
        with self._run_scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write_when_wanted)
                error = await self._read_loop()
                nursery.cancel_scope.cancel()
        self._close(self._closed or error)

    async def _read_loop(self) -> GrpcError:
        # Reading never waits for our own writes (a writer task sends what reading produced):
        # if both peers' readers blocked on full send buffers, neither would ever drain the other.
        try:
            while self._closed is None:
                data = await self._socket.receive_some(_READ_SIZE)
                if not data:
                    break
                try:
                    events = self._h2.receive_data(data)
                except h2.exceptions.ProtocolError as failure:
                    self._try_goaway(h2.errors.ErrorCodes.PROTOCOL_ERROR)
                    await self._flush_quietly()
                    return GrpcError(StatusCode.INTERNAL, f"HTTP/2 protocol error from the peer: {failure}")
                for event in events:
                    self._dispatch(event)
                self._outgoing += self._h2.data_to_send()
                if len(self._outgoing) > _OUTGOING_HIGH_WATER:
                    await self.flush()
                elif self._outgoing:
                    self._flush_wanted.set()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as failure:
            return GrpcError(StatusCode.UNAVAILABLE, f"connection lost: {failure or type(failure).__name__}")
        except GrpcError as failure:  # from flush() when writing failed
            return failure
        return GrpcError(StatusCode.UNAVAILABLE, "connection closed by the peer")

    async def _write_when_wanted(self) -> None:
        while self._closed is None:
            await self._flush_wanted.wait()
            self._flush_wanted = trio.Event()
            await self._flush_quietly()

    def abort(self, error: GrpcError) -> None:
        """Fail every stream with `error` and stop the read loop (the owner closes the socket)."""
        self._close(error)
        self._run_scope.cancel()

    async def flush(self) -> None:
        """Write everything h2 has produced so far, in order."""
        self._outgoing += self._h2.data_to_send()
        async with self._write_lock:
            while self._outgoing:
                data = bytes(self._outgoing)
                self._outgoing.clear()
                try:
                    await self._socket.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as failure:
                    self._close(GrpcError(StatusCode.UNAVAILABLE, f"connection lost: {failure or type(failure).__name__}"))
                    raise self._closed from None

    async def _flush_quietly(self) -> None:
        try:
            await self.flush()
        except GrpcError:
            pass

    # --- used by streams -------------------------------------------------------------------

    def check_open(self) -> None:
        if self._closed is not None:
            raise self._closed

    async def open_stream(self, headers: Headers, make_stream: Callable[[int], GrpcStream]) -> GrpcStream:
        """Client side: start a new stream with request `headers`."""
        self.check_open()
        stream_id = self._h2.get_next_available_stream_id()
        stream = make_stream(stream_id)
        try:
            self._h2.send_headers(stream_id, headers)
        except h2.exceptions.TooManyStreamsError:
            raise GrpcError(StatusCode.RESOURCE_EXHAUSTED, "the peer allows no more concurrent streams") from None
        self._streams[stream_id] = stream
        await self.flush()
        return stream

    async def send_headers(self, stream_id: int, headers: Headers, *, end_stream: bool = False) -> None:
        self.check_open()
        try:
            self._h2.send_headers(stream_id, headers, end_stream=end_stream)
        except h2.exceptions.StreamClosedError:
            raise GrpcError(StatusCode.CANCELLED, "the stream was closed by the peer") from None
        await self.flush()

    async def send_data(self, stream: GrpcStream, data: bytes, *, end_stream: bool = False) -> None:
        """Send `data` in frames no larger than the peer allows, waiting for window when needed."""
        view = memoryview(data)
        while True:
            self.check_open()
            stream.check_sendable()
            try:
                window = self._h2.local_flow_control_window(stream.stream_id)
            except h2.exceptions.StreamClosedError:
                raise GrpcError(StatusCode.CANCELLED, "the stream was closed by the peer") from None
            size = min(window, self._h2.max_outbound_frame_size, len(view))
            if size == 0 and view:
                await self._wait_for_window()
                continue
            last = size == len(view)
            try:
                self._h2.send_data(stream.stream_id, bytes(view[:size]), end_stream=end_stream and last)
            except h2.exceptions.StreamClosedError:
                raise GrpcError(StatusCode.CANCELLED, "the stream was closed by the peer") from None
            view = view[size:]
            await self.flush()
            if last:
                return

    async def end_stream(self, stream_id: int) -> None:
        self.check_open()
        try:
            self._h2.end_stream(stream_id)
        except h2.exceptions.StreamClosedError:
            raise GrpcError(StatusCode.CANCELLED, "the stream was closed by the peer") from None
        await self.flush()

    def reset_stream(self, stream_id: int, error_code: h2.errors.ErrorCodes) -> None:
        """Queue RST_STREAM if the stream is still open on our side (sent with the next flush)."""
        if self._closed is not None:
            return
        try:
            self._h2.reset_stream(stream_id, error_code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass  # already closed both ways: nothing to reset

    def acknowledge(self, stream_id: int, size: int) -> None:
        """Hand `size` consumed bytes back to the peer's windows (sent with the next flush)."""
        if size and self._closed is None:
            self._h2.acknowledge_received_data(size, stream_id)

    def release(self, stream_id: int) -> None:
        """Forget a finished stream."""
        self._streams.pop(stream_id, None)

    async def ping(self, timeout: float) -> bool:
        """Send a PING and report whether its ACK came back within `timeout` seconds."""
        self.check_open()
        self._ping_acked = trio.Event()
        self._h2.ping(os.urandom(8))
        await self.flush()
        with trio.move_on_after(timeout):
            await self._ping_acked.wait()
            return True
        return False

    # --- internals -------------------------------------------------------------------------

    async def _wait_for_window(self) -> None:
        event = self._window_opened
        await event.wait()

    def _wake_senders(self) -> None:
        self._window_opened.set()
        self._window_opened = trio.Event()

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            if self._on_request is None:
                self.reset_stream(event.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
                return
            self._streams[event.stream_id] = self._on_request(event.stream_id, list(event.headers or []))
            return
        if isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            self._wake_senders()
            return
        if isinstance(event, h2.events.PingAckReceived):
            self._ping_acked.set()
            return
        if isinstance(event, h2.events.ConnectionTerminated):
            # The ADS streams this transport carries are long-lived, so a GOAWAY ends them all;
            # the client reconnects.
            self._close(GrpcError(StatusCode.UNAVAILABLE, f"the peer closed the connection (GOAWAY {event.error_code!r})"))
            return
        stream_id = getattr(event, "stream_id", None)
        stream = self._streams.get(stream_id) if stream_id else None
        if isinstance(event, h2.events.DataReceived):
            if stream is None:
                # Data for a stream we already finished still counts against the connection window.
                self.acknowledge(event.stream_id, event.flow_controlled_length)
            else:
                stream.on_data(event.data, event.flow_controlled_length)
        elif stream is None:
            return
        elif isinstance(event, h2.events.ResponseReceived):
            stream.on_headers(list(event.headers or []))
        elif isinstance(event, h2.events.TrailersReceived):
            stream.on_trailers(list(event.headers or []))
        elif isinstance(event, h2.events.StreamEnded):
            stream.on_end()
        elif isinstance(event, h2.events.StreamReset):
            stream.fail(GrpcError(StatusCode.CANCELLED, f"the peer reset the stream ({event.error_code!r})"))
            self._wake_senders()

    def _try_goaway(self, code: h2.errors.ErrorCodes) -> None:
        try:
            self._h2.close_connection(error_code=code)
        except h2.exceptions.ProtocolError:
            pass

    def _close(self, error: GrpcError) -> None:
        if self._closed is None:
            self._closed = error
        for stream in list(self._streams.values()):
            stream.fail(self._closed)
        self._streams.clear()
        self._wake_senders()
