"""The agent's gRPC calls to the control planes' TLS port (15012): one call at a time over a
fresh or shared connection, failing over along the planes, with the workload's current client
certificate (or none before it has one)."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Sequence
from pathlib import Path

import trio

from meshctl.agent.control_tls import client_certificate_context, server_trust_context
from meshctl.grpc import GrpcChannel, GrpcError, StatusCode, open_grpc_channel

log = logging.getLogger("meshctl.agent")

CALL_TIMEOUT = 10.0
# A refusal is an answer: another plane (same store, same CA) would say the same.
_ANSWERS = frozenset(StatusCode) - {
    StatusCode.UNAVAILABLE, StatusCode.DEADLINE_EXCEEDED, StatusCode.CANCELLED, StatusCode.INTERNAL, StatusCode.UNKNOWN,
}  # fmt: skip


class TrustAnchorError(Exception):
    """The control plane's root bundle cannot be read (a usage error: exit 2)."""


class ControlPlanes:
    """Where the control planes are (their TLS gRPC ports), which one the agent follows now, and
    the TLS settings for connecting to them."""

    def __init__(self, addresses: Sequence[tuple[str, int]], ca_root: Path) -> None:
        if not addresses:
            raise ValueError("at least one control plane address is needed")
        self.addresses = tuple(addresses)
        self.current = self.addresses[0]
        self.ca_root = ca_root
        self.extra_roots_pem = b""  # the trust bundle (ROOTCA) the control plane sent over ADS
        self._client_credentials: tuple[bytes, bytes] | None = None  # chain PEM, key PEM
        self._contexts: dict[bool, ssl.SSLContext] = {}
        self.shared_channel: Callable[[tuple[str, int]], GrpcChannel | None] = lambda _plane: None
        self._file_roots = self._read_ca_root()  # a missing or unreadable bundle is refused at start

    def roots_pem(self) -> bytes:
        """The roots the planes' certificates must chain to: the --ca-root file (read again at
        every new certificate or trust bundle, so a rotation `meshctl serve` wrote there is
        picked up; if it went missing since, what it held before) and the ROOTCA from ADS."""
        try:
            self._file_roots = self._read_ca_root()
        except TrustAnchorError as error:
            log.warning("%s; keeping the roots read before", error)
        return self._file_roots + b"\n" + self.extra_roots_pem

    def _read_ca_root(self) -> bytes:
        try:
            from_file = self.ca_root.read_bytes()
        except OSError as error:
            raise TrustAnchorError(
                f"cannot read the control plane's root bundle {self.ca_root}: "
                f"{error.strerror or error} (give --ca-root FILE or $MESHCTL_CA_ROOT; "
                "`meshctl serve` writes it to <data dir>/ca/root-bundle.pem)"
            ) from None
        try:
            server_trust_context(from_file)
        except (ssl.SSLError, ValueError) as error:
            raise TrustAnchorError(f"{self.ca_root} is not a PEM root bundle (--ca-root): {error}") from None
        return from_file

    def use_client_certificate(self, chain_pem: bytes, key_pem: bytes) -> None:
        """New connections present this certificate; established ones keep theirs."""
        self._client_credentials = (chain_pem, key_pem)
        self._contexts.clear()

    def trust_roots(self, roots_pem: bytes) -> None:
        """Also trust these roots (the ROOTCA bundle from ADS), unless they do not parse."""
        if roots_pem == self.extra_roots_pem:
            return
        try:
            server_trust_context(roots_pem)
        except (ssl.SSLError, ValueError) as error:
            log.warning("ignoring a trust bundle that does not load: %s", error)
            return
        self.extra_roots_pem = roots_pem
        self._contexts.clear()

    def ssl_context(self, *, with_client_certificate: bool = True) -> ssl.SSLContext:
        mutual = with_client_certificate and self._client_credentials is not None
        context = self._contexts.get(mutual)
        if context is None:
            roots = self.roots_pem()
            if mutual:
                assert self._client_credentials is not None
                context = client_certificate_context(roots, *self._client_credentials)
            else:
                context = server_trust_context(roots)
            self._contexts[mutual] = context
        return context

    async def call(
        self,
        method: str,
        request: bytes,
        *,
        metadata: Sequence[tuple[str, str]] = (),
        with_client_certificate: bool = True,
        fail_over: bool = True,
    ) -> bytes:
        """One unary call to the current plane, else (while unreachable) the next ones in turn.

        A plane's answer, refusal included, ends the round: GrpcError with its status. When no
        plane answers, GrpcError(UNAVAILABLE) naming the last failure.
        """
        start = self.addresses.index(self.current) if self.current in self.addresses else 0
        rounds = len(self.addresses) if fail_over else 1
        last: GrpcError | None = None
        for step in range(rounds):
            plane = self.addresses[(start + step) % len(self.addresses)]
            try:
                answer = await self._call_on(plane, method, request, metadata, with_client_certificate)
            except GrpcError as error:
                if error.code in _ANSWERS:
                    self.current = plane
                    raise
                log.info("control plane %s:%s: %s", plane[0], plane[1], error)
                last = error
                continue
            self.current = plane
            return answer
        assert last is not None
        raise GrpcError(StatusCode.UNAVAILABLE, last.message)

    async def _call_on(
        self,
        plane: tuple[str, int],
        method: str,
        request: bytes,
        metadata: Sequence[tuple[str, str]],
        with_client_certificate: bool,
    ) -> bytes:
        shared = self.shared_channel(plane) if with_client_certificate else None
        try:
            with trio.fail_after(CALL_TIMEOUT):
                if shared is not None and shared.closed is None:
                    try:
                        return await shared.unary(method, request, metadata)
                    except GrpcError as error:
                        if error.code in _ANSWERS and error.code not in (
                            StatusCode.UNAUTHENTICATED, StatusCode.PERMISSION_DENIED
                        ):
                            raise
                        # That connection may carry an older certificate: try a fresh one.
                context = self.ssl_context(with_client_certificate=with_client_certificate)
                host, port = plane
                async with open_grpc_channel(host, port, ssl_context=context, keepalive_interval=None) as channel:
                    return await channel.unary(method, request, metadata)
        except trio.TooSlowError:
            raise GrpcError(StatusCode.DEADLINE_EXCEEDED, f"no answer within {CALL_TIMEOUT:g}s") from None
