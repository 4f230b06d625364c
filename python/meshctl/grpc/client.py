"""A small gRPC client on trio: one h2c or TLS connection (a channel) carrying bidirectional streaming calls."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import h2.errors
import trio

from meshctl.grpc.limits import DEFAULT_LIMITS, Limits
from meshctl.grpc.status import (
    HTTP_TO_GRPC,
    GrpcError,
    StatusCode,
    decode_message,
    status_from_value,
)
from meshctl.grpc.stream import GrpcStream, headers_dict
from meshctl.grpc.transport import Headers, Transport

USER_AGENT = b"meshctl-grpc"


class ClientStream(GrpcStream):
    """The client's side of one call: `receive_message()` returns None when the call ended OK and
    raises GrpcError with the trailers' status otherwise."""

    def __init__(self, transport: Transport, stream_id: int) -> None:
        super().__init__(transport, stream_id)
        self.response_headers: dict[bytes, bytes] | None = None
        self.trailers: dict[bytes, bytes] | None = None
        self._sending_closed = False

    async def close_sending(self) -> None:
        """Half-close: tell the server no more messages will come. A call the server already
        ended needs no half-close; receive_message() reports how it ended."""
        async with self._send_lock:
            if self._sending_closed or self._input_ended or self._send_error is not None:
                return
            self._sending_closed = True
            try:
                await self._transport.end_stream(self.stream_id)
            except GrpcError:
                if self._transport.closed is not None:
                    raise  # the connection is gone, not just this call

    async def send_message(self, payload: bytes) -> None:
        try:
            await super().send_message(payload)
        except GrpcError:
            # A server that ends the call early (say, RESOURCE_EXHAUSTED) then resets the stream;
            # its status, not the reset, is what the caller needs to see.
            outcome = self._trailer_error()
            if outcome is not None:
                raise outcome from None
            raise

    def fail(self, error: GrpcError) -> None:
        if self._input_ended:
            # The call is complete and its outcome stays what the trailers said; a later reset
            # (gRPC servers send NO_ERROR) only means nothing more may be sent.
            self.stop_sending(error)
            return
        super().fail(error)

    def on_headers(self, headers: Headers) -> None:
        values = headers_dict(headers)
        self.response_headers = values
        status = values.get(b":status", b"")
        if status != b"200":
            code = HTTP_TO_GRPC.get(int(status) if status.isdigit() else 0, StatusCode.UNKNOWN)
            self.fail(GrpcError(code, f"the server answered HTTP {status.decode('ascii', 'replace')}"))
        elif b"grpc-status" in values:
            self.trailers = values  # a trailers-only response
        elif not values.get(b"content-type", b"").startswith(b"application/grpc"):
            self.fail(GrpcError(StatusCode.UNKNOWN, "the response is not application/grpc"))

    def on_trailers(self, headers: Headers) -> None:
        self.trailers = headers_dict(headers)

    async def _end_of_input(self) -> bytes | None:
        if self.trailers is None:
            raise GrpcError(StatusCode.INTERNAL, "the call ended without a grpc-status")
        outcome = self._trailer_error()
        if outcome is not None:
            raise outcome
        return None

    def _trailer_error(self) -> GrpcError | None:
        if self.trailers is None:
            return None
        code = status_from_value(self.trailers.get(b"grpc-status"))
        if code == StatusCode.OK:
            return None
        return GrpcError(code, decode_message(self.trailers.get(b"grpc-message")))


class GrpcChannel:
    """One connection to a gRPC server; open calls on it with `open_stream`."""

    def __init__(self, transport: Transport, authority: str, *, scheme: str = "http") -> None:
        self._transport = transport
        self._authority = authority.encode("ascii")
        self._scheme = scheme.encode("ascii")

    @property
    def closed(self) -> GrpcError | None:
        return self._transport.closed

    @asynccontextmanager
    async def open_stream(
        self, method_path: str, metadata: Sequence[tuple[str, str]] = ()
    ) -> AsyncIterator[ClientStream]:
        """Start a bidirectional streaming call; leaving the block cancels it if still open."""
        headers = [
            (b":method", b"POST"),
            (b":scheme", self._scheme),
            (b":path", method_path.encode("ascii")),
            (b":authority", self._authority),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            (b"user-agent", USER_AGENT),
            *((name.lower().encode("ascii"), value.encode("ascii")) for name, value in metadata),
        ]
        stream = await self._transport.open_stream(headers, lambda sid: ClientStream(self._transport, sid))
        assert isinstance(stream, ClientStream)
        try:
            yield stream
        finally:
            self._transport.reset_stream(stream.stream_id, h2.errors.ErrorCodes.CANCEL)
            self._transport.release(stream.stream_id)
            stream.fail(GrpcError(StatusCode.CANCELLED, "the call was closed by this client"))
            # Best effort: the RST_STREAM goes out with the next write if this one cannot.
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                try:
                    await self._transport.flush()
                except GrpcError:
                    pass

    async def unary(
        self, method_path: str, request: bytes, metadata: Sequence[tuple[str, str]] = ()
    ) -> bytes:
        """One request, one response (a unary call); GrpcError with the server's status if the
        call fails."""
        async with self.open_stream(method_path, metadata) as stream:
            await stream.send_message(request)
            await stream.close_sending()
            response = await stream.receive_message()
            if response is None:
                raise GrpcError(StatusCode.INTERNAL, f"{method_path} ended without a response")
            if await stream.receive_message() is not None:
                raise GrpcError(StatusCode.INTERNAL, f"{method_path} sent more than one response")
            return response

    async def _keepalive(self, interval: float, timeout: float) -> None:
        # A control plane behind a dead network path never sends FIN or RST; only an unanswered
        # PING tells us to reconnect.
        while self._transport.closed is None:
            await trio.sleep(interval)
            try:
                answered = await self._transport.ping(timeout)
            except GrpcError:
                return
            if not answered:
                self._transport.abort(GrpcError(StatusCode.UNAVAILABLE, f"no PING answer within {timeout:g}s"))
                return


@asynccontextmanager
async def open_grpc_channel(
    host: str,
    port: int,
    *,
    limits: Limits = DEFAULT_LIMITS,
    connect_timeout: float = 5.0,
    keepalive_interval: float | None = 20.0,
    keepalive_timeout: float = 10.0,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> AsyncIterator[GrpcChannel]:
    """Connect and yield a channel; the connection closes when the block exits.

    Without `ssl_context`: h2c with prior knowledge. With it: TLS, ALPN h2, the server verified
    as the context says (its certificate must name `server_hostname`, default `host`, when the
    context checks hostnames); a client certificate loaded into the context is presented.
    Raises GrpcError(UNAVAILABLE) if the server cannot be reached or the TLS handshake fails
    within `connect_timeout`.
    """
    stream: trio.abc.Stream
    try:
        with trio.fail_after(connect_timeout):
            stream = await trio.open_tcp_stream(host, port)
            if ssl_context is not None:
                stream = await _start_tls(stream, ssl_context, server_hostname or host, f"{host}:{port}")
    except (OSError, trio.TooSlowError) as error:
        raise GrpcError(StatusCode.UNAVAILABLE, f"cannot connect to {host}:{port}: {error or 'timed out'}") from None
    try:
        async with stream, trio.open_nursery() as nursery:
            transport = Transport(stream, client_side=True, limits=limits)
            await transport.start()
            authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            channel = GrpcChannel(transport, authority, scheme="https" if ssl_context else "http")
            nursery.start_soon(transport.run)
            if keepalive_interval:
                nursery.start_soon(channel._keepalive, keepalive_interval, keepalive_timeout)
            try:
                yield channel
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The background tasks end quietly, so a lone exception here is what the caller's block
        # (or start()) raised: hand it back unwrapped, so `except GrpcError` works for callers.
        if len(group.exceptions) != 1:
            raise
        error = group.exceptions[0]
        raise error from error.__cause__


async def _start_tls(
    socket_stream: trio.SocketStream, context: ssl.SSLContext, server_hostname: str, where: str
) -> trio.SSLStream:
    # gRPC is HTTP/2 only (a context made for this channel: its ALPN list is set here).
    context.set_alpn_protocols(["h2"])
    tls_stream = trio.SSLStream(socket_stream, context, server_hostname=server_hostname)
    try:
        await tls_stream.do_handshake()
    except trio.BrokenResourceError as error:
        await trio.aclose_forcefully(tls_stream)
        cause = error.__cause__ or error
        raise GrpcError(StatusCode.UNAVAILABLE, f"TLS handshake with {where} failed: {cause}") from None
    except BaseException:
        await trio.aclose_forcefully(tls_stream)
        raise
    if tls_stream.selected_alpn_protocol() not in ("h2", None):
        await trio.aclose_forcefully(tls_stream)
        raise GrpcError(StatusCode.UNAVAILABLE, f"{where} does not speak HTTP/2 over TLS (ALPN)")
    return tls_stream
