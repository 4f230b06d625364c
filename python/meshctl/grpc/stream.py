"""One gRPC call's HTTP/2 stream as the application sees it: whole messages in, whole messages out."""

from __future__ import annotations

from collections import deque

import trio

from meshctl.grpc.framing import MessageDecoder, encode_message
from meshctl.grpc.status import GrpcError, StatusCode
from meshctl.grpc.transport import Headers, Transport


class GrpcStream:
    """The part of a gRPC stream shared by client and server.

    Received bytes are handed back to the peer's flow-control window only once the messages they
    carry have been taken by `receive_message()`, so a slow reader holds back its sender instead
    of growing our buffers.
    """

    def __init__(self, transport: Transport, stream_id: int) -> None:
        self.stream_id = stream_id
        self._transport = transport
        self._decoder = MessageDecoder(transport.limits.max_message_bytes)
        self._messages: deque[bytes] = deque()
        self._unacknowledged = 0
        self._input_ended = False
        self._error: GrpcError | None = None  # ends receiving
        self._send_error: GrpcError | None = None  # ends sending (set with _error, or alone)
        self._arrival = trio.Event()
        self._send_lock = trio.StrictFIFOLock()

    async def receive_message(self) -> bytes | None:
        """The next message; None once the peer has finished sending (and, for a client, the call
        ended OK). Raises GrpcError if the stream or the call failed."""
        while True:
            if self._messages:
                message = self._messages.popleft()
                if not self._messages:
                    self._return_window()
                    await self._transport.flush()
                else:
                    await trio.lowlevel.checkpoint()
                return message
            if self._error is not None:
                raise self._error
            if self._input_ended:
                return await self._end_of_input()
            self._arrival = trio.Event()
            await self._arrival.wait()

    async def send_message(self, payload: bytes) -> None:
        """Send one message, waiting while the peer's window is full."""
        async with self._send_lock:
            await self._before_first_message()
            await self._transport.send_data(self, encode_message(payload))

    def check_sendable(self) -> None:
        if self._send_error is not None:
            raise self._send_error

    # --- hooks for the subclasses -----------------------------------------------------------

    async def _before_first_message(self) -> None:
        pass

    async def _end_of_input(self) -> bytes | None:
        return None

    def on_headers(self, headers: Headers) -> None:
        self.fail(GrpcError(StatusCode.INTERNAL, "unexpected HEADERS on the stream"))

    def on_trailers(self, headers: Headers) -> None:
        self.fail(GrpcError(StatusCode.INTERNAL, "unexpected trailers on the stream"))

    # --- called by the transport ----------------------------------------------------------

    def on_data(self, data: bytes, flow_controlled_length: int) -> None:
        self._unacknowledged += flow_controlled_length
        if self._error is not None:
            self._return_window()  # nobody will read it; do not let it pin the connection window
            return
        try:
            self._messages.extend(self._decoder.feed(data))
        except GrpcError as error:
            self.fail(error)
            return
        if not self._messages:
            # Only a partial message is held: its bytes are needed to complete it, so let them flow.
            self._return_window()
        self._arrival.set()

    def on_end(self) -> None:
        if not self._decoder.at_message_boundary():
            self.fail(GrpcError(StatusCode.INTERNAL, "the stream ended in the middle of a message"))
            return
        self._input_ended = True
        self._arrival.set()

    def fail(self, error: GrpcError) -> None:
        """Mark the stream failed (first error wins) and wake whoever waits on it."""
        if self._error is None:
            self._error = error
        self.stop_sending(error)
        self._messages.clear()
        self._return_window()
        self._arrival.set()

    def stop_sending(self, error: GrpcError) -> None:
        """Make every send on this stream fail with `error` from now on (first error wins)."""
        if self._send_error is None:
            self._send_error = error

    def _return_window(self) -> None:
        size, self._unacknowledged = self._unacknowledged, 0
        self._transport.acknowledge(self.stream_id, size)


def headers_dict(headers: Headers) -> dict[bytes, bytes]:
    return {name: value for name, value in headers}
