"""A small HTTP/1.1 client on trio (h11) for etcd's JSON gateway: JSON POSTs and one streamed response."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import h11
import trio

# A range over every resource of a large mesh is a few MiB; anything far past this is a bug or
# a hostile peer, and must not take the control plane's memory with it.
MAX_BODY = 64 * 1024 * 1024
_READ_SIZE = 64 * 1024


class TransportError(Exception):
    """The connection failed, closed early or spoke malformed HTTP: safe to retry elsewhere."""


class HttpConnection:
    """One HTTP/1.1 connection to one etcd member, one request at a time."""

    def __init__(self, stream: trio.SocketStream, authority: str) -> None:
        self._stream = stream
        self._authority = authority
        self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=64 * 1024)

    @classmethod
    async def open(cls, host: str, port: int) -> HttpConnection:
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError as error:
            # trio says "all attempts failed" and keeps the reasons (refused, unreachable) in a group.
            causes = getattr(error.__cause__, "exceptions", ())
            reason = causes[-1] if causes and isinstance(causes[-1], OSError) else error
            raise TransportError(f"cannot connect: {reason.strerror or reason}") from None
        return cls(stream, f"{host}:{port}")

    @property
    def reusable(self) -> bool:
        return self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE

    async def post_json(
        self, path: str, payload: dict[str, Any], headers: list[tuple[str, str]] = ()
    ) -> tuple[int, Any]:
        """POST `payload`, return (status, decoded JSON body). The caller bounds the time."""
        status = await self.start_post(path, payload, headers)
        body = bytearray()
        async for chunk in self.body_chunks():
            body += chunk
            if len(body) > MAX_BODY:
                raise TransportError(f"response to {path} is larger than {MAX_BODY} bytes")
        if self.reusable:
            self._h11.start_next_cycle()
        try:
            return status, json.loads(body) if body else {}
        except ValueError:
            raise TransportError(f"response to {path} is not JSON: {bytes(body[:200])!r}") from None

    async def start_post(
        self, path: str, payload: dict[str, Any], headers: list[tuple[str, str]] = ()
    ) -> int:
        """Send the request and read the response head; returns the status code."""
        data = json.dumps(payload, separators=(",", ":")).encode()
        request = h11.Request(
            method="POST",
            target=path,
            headers=[
                ("Host", self._authority),
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(data))),
                *headers,
            ],
        )
        try:
            await self._stream.send_all(
                self._h11.send(request) + self._h11.send(h11.Data(data=data))
                + self._h11.send(h11.EndOfMessage())
            )  # fmt: skip
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as error:
            raise TransportError(f"connection lost while sending: {error}") from None
        event = await self._next_event()
        if not isinstance(event, h11.Response):
            raise TransportError(f"unexpected {type(event).__name__} instead of a response")
        return event.status_code

    async def body_chunks(self) -> AsyncIterator[bytes]:
        """The response body as it arrives (a watch's body never ends)."""
        while True:
            event = await self._next_event()
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return
            else:
                raise TransportError(f"unexpected {type(event).__name__} in a response body")

    async def _next_event(self) -> h11.Event:
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as error:
                raise TransportError(f"connection broke mid-response: {error}") from None
            if event is h11.NEED_DATA:
                try:
                    data = await self._stream.receive_some(_READ_SIZE)
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as error:
                    raise TransportError(f"connection lost: {error}") from None
                self._h11.receive_data(data)
                continue
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                raise TransportError("connection closed by etcd")
            return event

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self._stream.aclose()


async def json_lines(chunks: AsyncIterator[bytes], limit: int = MAX_BODY) -> AsyncIterator[Any]:
    """Split a streamed gateway response into its messages (one JSON object per line)."""
    buffer = bytearray()
    async for chunk in chunks:
        buffer += chunk
        while (end := buffer.find(b"\n")) >= 0:
            line = bytes(buffer[:end]).strip()
            del buffer[: end + 1]
            if line:
                try:
                    yield json.loads(line)
                except ValueError:
                    raise TransportError(f"stream message is not JSON: {line[:200]!r}") from None
        if len(buffer) > limit:
            raise TransportError(f"a stream message is larger than {limit} bytes")
    raise TransportError("stream ended")
