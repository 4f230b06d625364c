"""A small gRPC server on trio: accepts h2c or TLS (ALPN h2) connections and routes each call by :path
to a handler."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping

import h2.errors
import trio

from meshctl.grpc.limits import DEFAULT_LIMITS, Limits
from meshctl.grpc.status import GrpcError, StatusCode, encode_message
from meshctl.grpc.stream import GrpcStream, headers_dict
from meshctl.grpc.transport import Headers, Transport

log = logging.getLogger(__name__)

Handler = Callable[["ServerStream"], Awaitable[None]]
# A fixed context, or a function returning the current one (asked at every connection, so new
# certificates or trust roots apply to new connections without a restart).
SslContextSource = ssl.SSLContext | Callable[[], ssl.SSLContext]

# A client that opened TCP but does not finish the TLS handshake must not hold a slot for long.
HANDSHAKE_TIMEOUT = 10.0


class ServerStream(GrpcStream):
    """The server's side of one call. A handler returning normally ends the call with OK; raising
    GrpcError ends it with that status; any other exception ends it with INTERNAL."""

    def __init__(self, transport: Transport, stream_id: int, headers: Headers) -> None:
        super().__init__(transport, stream_id)
        self.request_headers = headers_dict(headers)
        self.peer = ""
        # Over TLS: the client certificate (DER) the handshake verified; None when the client
        # sent none, or on h2c.
        self.peer_certificate: bytes | None = None
        self.tls = False
        self._headers_sent = False

    def metadata(self, name: str) -> str | None:
        """A request metadata value (a header that is not a pseudo-header), or None."""
        value = self.request_headers.get(name.lower().encode("ascii"))
        return value.decode("latin-1") if value is not None else None

    @property
    def path(self) -> str:
        return self.request_headers.get(b":path", b"").decode("ascii", errors="replace")

    async def _before_first_message(self) -> None:
        if not self._headers_sent:
            self._headers_sent = True
            await self._transport.send_headers(self.stream_id, _response_headers())

    async def finish(self, code: StatusCode, message: str = "") -> None:
        """Send the trailers (or a trailers-only response) and let go of the stream."""
        try:
            if self._transport.closed is None:
                trailers = [(b"grpc-status", str(int(code)).encode())]
                if message:
                    trailers.append((b"grpc-message", encode_message(message)))
                async with self._send_lock:
                    head = [] if self._headers_sent else _response_headers()
                    self._headers_sent = True
                    await self._transport.send_headers(self.stream_id, head + trailers, end_stream=True)
                if not self._input_ended:
                    # The call is over; tell the client to stop sending rather than buffer it.
                    self._transport.reset_stream(self.stream_id, h2.errors.ErrorCodes.NO_ERROR)
                    await self._transport.flush()
        except GrpcError:
            pass  # the peer or the connection is gone; there is nobody to tell
        finally:
            self.fail(GrpcError(StatusCode.CANCELLED, "the call has finished"))
            self._transport.release(self.stream_id)


def _response_headers() -> Headers:
    return [(b":status", b"200"), (b"content-type", b"application/grpc")]


async def serve_grpc(
    handlers: Mapping[str, Handler],
    host: str,
    port: int,
    *,
    limits: Limits = DEFAULT_LIMITS,
    max_connections: int = 1024,
    ssl_context: SslContextSource | None = None,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve gRPC calls on host:port until cancelled: over TLS with `ssl_context` (its ALPN must
    offer h2; a client certificate it verified is the calls' `peer_certificate`), else h2c.

    `handlers` maps a method path ("/package.Service/Method") to its handler. task_status.started
    gets the bound (host, port), which tells the caller the port when `port` is 0.
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[:2]
    active = 0

    async def serve_connection(socket_stream: trio.SocketStream) -> None:
        nonlocal active
        if active >= max_connections:
            # Over the bound: close at once rather than queue; the client retries with backoff.
            await socket_stream.aclose()
            return
        active += 1
        try:
            if ssl_context is None:
                await _serve_connection(socket_stream, handlers, limits)
            else:
                context = ssl_context() if callable(ssl_context) else ssl_context
                await _serve_tls_connection(socket_stream, context, handlers, limits)
        except Exception:
            # One connection's failure (a bug, or a peer driving h2 somewhere unexpected) must not
            # take down the listener and every other connection with it.
            log.exception("gRPC connection failed")
        finally:
            active -= 1

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, serve_connection, listeners)
        task_status.started(bound)


async def _serve_tls_connection(
    socket_stream: trio.SocketStream, context: ssl.SSLContext, handlers: Mapping[str, Handler], limits: Limits
) -> None:
    tls_stream = trio.SSLStream(socket_stream, context, server_side=True)
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            await tls_stream.do_handshake()
    except (trio.BrokenResourceError, trio.TooSlowError) as error:
        # A plaintext client, an untrusted client certificate, or a scanner: not our failure.
        cause = error.__cause__ or error
        log.info("TLS handshake with %s failed: %s", _peer_of(socket_stream), cause or "timed out")
        await trio.aclose_forcefully(tls_stream)
        return
    protocol = tls_stream.selected_alpn_protocol()
    if protocol not in (None, "h2"):
        log.info("%s negotiated ALPN %r, not h2; closing", _peer_of(socket_stream), protocol)
        await trio.aclose_forcefully(tls_stream)
        return
    certificate = tls_stream.getpeercert(binary_form=True)
    await _serve_connection(tls_stream, handlers, limits, peer_certificate=certificate or None)


def _peer_of(socket_stream: trio.SocketStream) -> str:
    try:
        return "{}:{}".format(*socket_stream.socket.getpeername()[:2])
    except OSError:
        return "unknown"


async def _serve_connection(
    stream: trio.abc.Stream,
    handlers: Mapping[str, Handler],
    limits: Limits,
    *,
    peer_certificate: bytes | None = None,
) -> None:
    socket_stream = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    peer = _peer_of(socket_stream)  # type: ignore[arg-type]
    tls = isinstance(stream, trio.SSLStream)
    async with stream, trio.open_nursery() as calls:

        def on_request(stream_id: int, headers: Headers) -> GrpcStream:
            call = ServerStream(transport, stream_id, headers)
            call.peer = peer
            call.peer_certificate = peer_certificate
            call.tls = tls
            calls.start_soon(_run_call, call, handlers)
            return call

        transport = Transport(stream, client_side=False, limits=limits, on_request=on_request)
        try:
            await transport.start()
            await transport.run()
        except GrpcError:
            pass  # the connection failed while starting; its streams were told
        calls.cancel_scope.cancel()


async def _run_call(stream: ServerStream, handlers: Mapping[str, Handler]) -> None:
    method = stream.request_headers.get(b":method")
    content_type = stream.request_headers.get(b"content-type", b"")
    handler = handlers.get(stream.path)
    if method != b"POST" or not content_type.startswith(b"application/grpc"):
        await stream.finish(StatusCode.INTERNAL, "a gRPC call is a POST with content-type application/grpc")
        return
    if handler is None:
        await stream.finish(StatusCode.UNIMPLEMENTED, f"unknown method {stream.path}")
        return
    try:
        await handler(stream)
    except GrpcError as error:
        code, message = error.code, error.message
    except Exception as error:  # a handler bug must end only its own call
        log.exception("gRPC handler for %s failed", stream.path)
        code, message = StatusCode.INTERNAL, f"internal error: {type(error).__name__}"
    else:
        code, message = StatusCode.OK, ""
    await stream.finish(code, message)
