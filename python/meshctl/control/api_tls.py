"""The REST API's TLS side: one port answers both plaintext HTTP and TLS (told apart by the first byte),
and over TLS a verified operator certificate, spiffe://TRUST_DOMAIN/ns/meshctl-system/sa/NAME,
stands in for the API token."""

from __future__ import annotations

import logging
import socket

import trio

from meshctl.control.api_handlers import ApiError
from meshctl.control.identity_authority import IdentityAuthority
from meshctl.control.peer_certificates import PeerCertificateError, certificate_identity
from meshctl.control.xds_tls import ServerTls
from meshctl.identity.spiffe import SpiffeId

log = logging.getLogger("meshctl.control.api")

# Operators' certificates are issued in this namespace (as Istio keeps its own in istio-system).
# Only holders of the API token or of an operator certificate can mint identities here (join
# tokens, operator CSRs), so no workload can obtain one on its own.
OPERATOR_NAMESPACE = "meshctl-system"
# A TLS connection starts with a handshake record (content type 22); an HTTP request with a
# method name, which is ASCII letters. One byte tells them apart.
TLS_HANDSHAKE_RECORD = 0x16
HANDSHAKE_TIMEOUT = 10.0


def operator_identity(trust_domain: str, name: str) -> SpiffeId:
    """The SPIFFE ID of operator NAME (SpiffeIdError if NAME is not a service account name)."""
    return SpiffeId(trust_domain, OPERATOR_NAMESPACE, name)


def operator_pattern(trust_domain: str) -> str:
    return f"spiffe://{trust_domain}/ns/{OPERATOR_NAMESPACE}/sa/NAME"


class ApiTls:
    """The API port's server certificate (from the CA, renewed like the xDS port's) and the check
    of the client certificate a request arrived with."""

    def __init__(self, server_tls: ServerTls, authority: IdentityAuthority) -> None:
        self.server_tls = server_tls
        self.authority = authority

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the server certificate fresh, and follow root rotations, until cancelled."""
        self.authority.on_roots_changed.append(self.server_tls.rebuild)
        try:
            await self.server_tls.serve(task_status=task_status)
        finally:
            self.authority.on_roots_changed.remove(self.server_tls.rebuild)

    async def accept(
        self, stream: trio.SocketStream, wait: float
    ) -> tuple[trio.abc.Stream, bytes | None] | None:
        """The stream to speak HTTP on and the verified client certificate (DER) if any:
        `stream` itself for plaintext, an SSLStream once a TLS handshake completed. None if the
        client sent nothing for `wait` seconds, left, or failed the handshake."""
        first = b""
        with trio.move_on_after(wait):
            try:
                first = await stream.socket.recv(1, socket.MSG_PEEK)
            except OSError:
                return None
        if not first:  # left, or idle too long
            return None
        if first[0] != TLS_HANDSHAKE_RECORD:
            return stream, None
        tls = trio.SSLStream(
            stream, self.server_tls.context(), server_side=True, https_compatible=True
        )
        with trio.move_on_after(HANDSHAKE_TIMEOUT) as scope:
            try:
                await tls.do_handshake()
            except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
                # The reason (unknown CA, expired, no shared cipher) names no key material.
                log.warning(
                    "TLS handshake with %s failed: %s", _peer(stream), error.__cause__ or error
                )
                return None
        if scope.cancelled_caught:
            log.warning(
                "TLS handshake with %s not completed in %.0fs", _peer(stream), HANDSHAKE_TIMEOUT
            )
            return None
        return tls, tls.getpeercert(binary_form=True)

    def authorize(self, certificate_der: bytes | None, token_ok: bool) -> str:
        """Who the caller is ("the API token", or its certificate) for a request that came over
        TLS; ApiError (401, 403 or 503) naming why it may not call the API."""
        if certificate_der is None:
            if token_ok:
                return "the API token"
            raise ApiError(
                "unauthorized",
                "no API token and no client certificate: send Authorization: Bearer <token>, or "
                f"connect with an operator certificate ({operator_pattern(self.authority.ca.trust_domain)}, "
                "from `meshctl identity operator-cert`)",
            )
        if not self.authority.revocations_loaded:
            raise ApiError(
                "unavailable", "the certificate authority is still loading revocations; retry"
            )
        try:
            peer = certificate_identity(certificate_der, self.authority)
        except PeerCertificateError as error:
            code = "forbidden" if error.reason == "foreign" else "unauthorized"
            raise ApiError(code, error.message) from None
        if peer.identity.namespace == OPERATOR_NAMESPACE:
            return f"operator {peer.describe()}"
        if token_ok:  # a workload's certificate only encrypts; the token authorises
            return "the API token"
        raise ApiError(
            "forbidden",
            f"{peer.describe()} is not an operator identity: the API accepts "
            f"{operator_pattern(self.authority.ca.trust_domain)} certificates, or the API token",
        )


def _peer(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return "a client"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
