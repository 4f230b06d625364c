"""The control plane's REST API over HTTP/1.1 (h11 on trio), with bearer-token auth and bounded requests;
with `tls`, the same port also speaks TLS, where an operator's client certificate replaces the token."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import h11
import trio

from meshctl.control.api_handlers import Api, ApiError, Request
from meshctl.control.api_tls import ApiTls
from meshctl.control.auth import authorized
from meshctl.control.store import Store

log = logging.getLogger("meshctl.control.api")


@dataclass(frozen=True)
class Limits:
    """Bounds that keep one client from holding the control plane's memory or connections."""

    max_body: int = 4 * 1024 * 1024  # a 1,000-route config is well under 1 MiB
    max_header: int = 16 * 1024
    max_connections: int = 64
    request_timeout: float = 30.0  # to read a whole request once it has started
    idle_timeout: float = 60.0  # between requests on a kept-alive connection


class _Close(Exception):
    """Stop serving this connection (after any response already sent)."""


async def serve_api(
    store: Store,
    token: str,
    host: str,
    port: int,
    limits: Limits = Limits(),
    *,
    extensions: Sequence[Any] = (),
    tls: ApiTls | None = None,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the API until cancelled. Reports the bound (host, port) through task_status."""
    server = _Server(Api(store, extensions), token, limits, tls)
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()
    async with trio.open_nursery() as nursery:
        if tls is not None:
            await nursery.start(tls.serve)  # the server certificate exists before anyone connects
        task_status.started((bound[0], bound[1]))
        await trio.serve_listeners(server.connection, listeners)


class _Server:
    def __init__(self, api: Api, token: str, limits: Limits, tls: ApiTls | None = None) -> None:
        self.api, self.token, self.limits, self.tls = api, token, limits, tls
        self.slots = trio.CapacityLimiter(limits.max_connections)

    async def connection(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                self.slots.acquire_nowait()
            except trio.WouldBlock:
                await self._refuse_busy(stream)
                return
            try:
                if self.tls is None:
                    await self._serve(stream)
                    return
                accepted = await self.tls.accept(stream, self.limits.idle_timeout)
                if accepted is None:
                    return
                http_stream, certificate = accepted
                if http_stream is stream:
                    await self._serve(stream)
                    return
                try:
                    await self._serve(http_stream, secure=True, certificate=certificate)
                finally:
                    with trio.move_on_after(1.0):
                        await http_stream.aclose()  # close_notify; the socket closes regardless
            except (_Close, trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                self.slots.release()

    async def _refuse_busy(self, stream: trio.SocketStream) -> None:
        connection = h11.Connection(h11.SERVER)
        connection.receive_data(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")  # lets h11 send a response
        connection.next_event()
        error = ApiError("unavailable", "too many connections to the control plane; retry shortly")
        try:
            await _send(stream, connection, error.status, error.as_json(), close=True)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _serve(
        self, stream: trio.abc.Stream, secure: bool = False, certificate: bytes | None = None
    ) -> None:
        """HTTP/1.1 on `stream`; `secure` over TLS, with the verified client certificate if any."""
        connection = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_header)
        while True:
            with trio.move_on_after(self.limits.idle_timeout):
                event = await _next_event(stream, connection)
            if event is None:  # idle too long
                return
            if isinstance(event, h11.ConnectionClosed):
                return
            with trio.move_on_after(self.limits.request_timeout) as scope:
                status, body, close = await self._exchange(
                    stream, connection, event, secure, certificate
                )
            if scope.cancelled_caught:
                error = ApiError("bad_request", "request not received in time")
                status, body, close = error.status, error.as_json(), True
            await _send(stream, connection, status, body, close)
            if close or connection.our_state is not h11.DONE:
                await _linger(stream, self.limits.max_body)
                return
            connection.start_next_cycle()

    async def _exchange(
        self,
        stream: trio.abc.Stream,
        connection: h11.Connection,
        event: Any,
        secure: bool = False,
        certificate: bytes | None = None,
    ) -> tuple[int, dict[str, Any], bool]:
        """Read the rest of the request, answer it: (status, JSON body, close the connection)."""
        if isinstance(event, ApiError):  # the request line or headers were malformed
            return event.status, event.as_json(), True
        assert isinstance(event, h11.Request)
        # h11 bounds only a head still arriving; one that came in a single read is checked here.
        head_size = len(event.target) + sum(
            len(name) + len(value) + 4 for name, value in event.headers
        )
        if head_size > self.limits.max_header:
            error = ApiError("too_large", f"request headers over {self.limits.max_header} bytes")
            return error.status, error.as_json(), True
        headers = dict(event.headers)
        target = urlsplit(event.target.decode("ascii", "replace"))
        request = Request(
            event.method.decode("ascii", "replace"),
            unquote(target.path),
            dict(parse_qsl(target.query)),
        )
        caller = ""
        if request.path != "/healthz":
            token_ok = authorized(headers.get(b"authorization"), self.token)
            if secure and self.tls is not None:
                try:
                    caller = self.tls.authorize(certificate, token_ok)
                except ApiError as error:
                    log.warning("%s %s: %d (%s)", request.method, request.path, error.status,
                                error.message)  # fmt: skip
                    return error.status, error.as_json(), True
            elif not token_ok:
                log.warning("%s %s: 401 (missing or wrong token)", request.method, request.path)
                # Close instead of reading the body: an unauthenticated client gets no buffer space.
                error = ApiError(
                    "unauthorized", "missing or wrong API token (Authorization: Bearer <token>)"
                )
                return error.status, error.as_json(), True
        declared = headers.get(b"content-length")
        if declared is not None and int(declared) > self.limits.max_body:
            return self._too_large()
        body = bytearray()
        while True:
            part = await _next_event(stream, connection)
            if isinstance(part, h11.Data):
                body += part.data
                if len(body) > self.limits.max_body:
                    return self._too_large()
            elif isinstance(part, h11.EndOfMessage):
                break
            elif isinstance(part, ApiError):
                return part.status, part.as_json(), True
            else:  # the client went away mid-body
                raise _Close
        request.body = bytes(body)
        try:
            status, answer = await self.api.handle(request)
        except ApiError as error:
            status, answer = error.status, error.as_json()
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            error = ApiError("internal", "internal error in the control plane; see its log")
            status, answer = error.status, error.as_json()
        # Lease renewals arrive every few seconds from every sidecar: logged only when they fail.
        routine = request.path.startswith("/v1/sidecars/") and status == 200
        log.log(
            logging.DEBUG if routine else logging.INFO,
            "%s %s: %d%s",
            request.method,
            request.path,
            status,
            f" ({caller})" if caller.startswith("operator") else "",
        )
        return status, answer, False

    def _too_large(self) -> tuple[int, dict[str, Any], bool]:
        error = ApiError("too_large", f"request body over {self.limits.max_body} bytes")
        return error.status, error.as_json(), True


async def _next_event(stream: trio.abc.Stream, connection: h11.Connection) -> Any:
    """The next h11 event, or an ApiError when the client's bytes are not valid HTTP/1.1."""
    while True:
        try:
            event = connection.next_event()
        except h11.RemoteProtocolError as error:
            code = "too_large" if error.error_status_hint == 431 else "bad_request"
            return ApiError(code, f"malformed HTTP request: {error}")
        if event is not h11.NEED_DATA:
            return event
        data = await stream.receive_some(65536)
        try:
            connection.receive_data(data)
        except h11.RemoteProtocolError as error:
            return ApiError("bad_request", f"malformed HTTP request: {error}")


async def _linger(stream: trio.abc.Stream, budget: int) -> None:
    """Half-close, then discard what the client still sends for a moment: closing with unread
    bytes makes the kernel send RST, which can destroy the error response before it is read.
    (TLS cannot half-close: there the draining alone gives the client time to read.)"""
    try:
        if isinstance(stream, trio.abc.HalfCloseableStream):
            await stream.send_eof()
        with trio.move_on_after(1.0):
            while budget > 0:
                data = await stream.receive_some(65536)
                if not data:
                    break
                budget -= len(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def _send(
    stream: trio.abc.Stream,
    connection: h11.Connection,
    status: int,
    body: dict[str, Any],
    close: bool,
) -> None:
    if connection.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        raise _Close
    payload = json.dumps(body, indent=None).encode() + b"\n"
    headers = [("content-type", "application/json"), ("content-length", str(len(payload)))]
    if close:
        headers.append(("connection", "close"))
    try:
        data = connection.send(h11.Response(status_code=status, headers=headers))
        data += connection.send(h11.Data(data=payload))
        data += connection.send(h11.EndOfMessage())
    except h11.LocalProtocolError:
        raise _Close from None
    await stream.send_all(data)
