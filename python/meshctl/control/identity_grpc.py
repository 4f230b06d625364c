"""The gRPC methods beside ADS on the xDS port: Istio's CreateCertificate, and sidecar registration
(Register / Deregister) authenticated by the caller's client certificate.

Who may do what (CONTRACT.md):
- CreateCertificate: a join token (`authorization: Bearer meshctl-join...`: its SA and NS), a
  valid unrevoked client certificate (renewal: the same SPIFFE ID), or the API token (an
  operator: the CSR's URI SAN decides). The CSR must carry exactly that one URI SAN.
- Register / Deregister: a client certificate (the registration's namespace must be the
  certificate's; the certificate's SPIFFE ID is recorded as the instance's identity), or the API
  token (no identity recorded).
- JoinTokens/Describe: a join token only (the checks of CreateCertificate); answers the identity
  it grants (meshctl.identity.join_token_grant), so a sidecar asks the CA for exactly that one.
  The API token and client certificates are refused: they fix no identity, or the caller knows it.
"""

from __future__ import annotations

import datetime
import hmac
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import trio
from cryptography import x509
from google.protobuf import json_format, struct_pb2
from google.protobuf.message import DecodeError

from meshctl.control.api_handlers import ApiError
from meshctl.control.identity_authority import IdentityAuthority, IdentityError
from meshctl.control.istio_ca_messages import (
    CREATE_CERTIFICATE_METHOD,
    IstioCertificateRequest,
    IstioCertificateResponse,
)
from meshctl.control.peer_certificates import PeerCertificateError, certificate_identity
from meshctl.control.registry import Registry, Sidecar
from meshctl.control.registry_api import deregister, register
from meshctl.grpc import GrpcError, StatusCode
from meshctl.grpc.server import Handler, ServerStream
from meshctl.identity.ca import CsrError, CsrMismatch, load_csr
from meshctl.identity.join_token_grant import DESCRIBE_JOIN_TOKEN_METHOD, JoinTokenGrant
from meshctl.identity.spiffe import SpiffeId, SpiffeIdError
from meshctl.identity.tokens import JoinToken, JoinTokenError, is_join_token

log = logging.getLogger("meshctl.control.identity")

REGISTER_METHOD = "/meshctl.registry.v1.Registry/Register"
DEREGISTER_METHOD = "/meshctl.registry.v1.Registry/Deregister"


@dataclass(frozen=True)
class Caller:
    """Who is calling, as proven: `identity` is fixed for a join token or a certificate and None
    for an operator (the API token)."""

    kind: str  # "join token", "certificate", "operator"
    identity: SpiffeId | None
    description: str
    join_token: JoinToken | None = None  # the live token's record, for a join token


def peer_identity(
    stream: ServerStream, authority: IdentityAuthority
) -> tuple[SpiffeId, x509.Certificate] | None:
    """The SPIFFE ID of the client certificate the TLS handshake verified; None without one.
    GrpcError if it names no usable identity, is expired or is revoked."""
    if stream.peer_certificate is None:
        return None
    try:
        peer = certificate_identity(stream.peer_certificate, authority)
    except PeerCertificateError as error:
        code = (
            StatusCode.UNAUTHENTICATED
            if error.reason == "expired"
            else StatusCode.PERMISSION_DENIED
        )
        raise GrpcError(code, error.message) from None
    return peer.identity, peer.certificate


def authenticated_ads(handler: Handler, authority: IdentityAuthority, api_token: str) -> Handler:
    """`handler` (ADS) for callers who prove who they are: a valid client certificate from the
    mesh's CA (a sidecar; its stream ends once that certificate is revoked) or the API token
    (an operator's tool, or an Envoy given it as initial metadata). Anyone else could read every
    service's routes and endpoints, so they are refused."""

    async def checked(stream: ServerStream) -> None:
        try:
            found = peer_identity(stream, authority)
        except GrpcError as error:
            log.warning("refused ADS to %s: %s", stream.peer, error.message)
            raise
        if found is None:
            scheme, _, presented = (stream.metadata("authorization") or "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                presented.strip().encode(), api_token.encode()
            ):
                log.warning(
                    "refused ADS to %s: no client certificate and no API token", stream.peer
                )
                raise GrpcError(
                    StatusCode.UNAUTHENTICATED,
                    "ADS needs a client certificate from the mesh's CA or 'authorization: Bearer <API token>'",
                )
            await handler(stream)
            return
        identity, certificate = found
        serial = certificate.serial_number
        revoked = False
        try:
            async with trio.open_nursery() as nursery:

                async def until_revoked() -> None:
                    nonlocal revoked
                    generation = authority.generation
                    while not authority.revoked_serial(serial):
                        generation = await authority.wait_for_change(generation)
                    revoked = True
                    nursery.cancel_scope.cancel()

                async def serve() -> None:
                    await handler(stream)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(until_revoked)
                nursery.start_soon(serve)
        except BaseExceptionGroup as group:
            # The stream's GrpcError (a sidecar leaving resets its stream: CANCELLED) ends the
            # call with its status, as it does for a caller with the API token, rather than
            # being logged as a handler failure and answered INTERNAL. Beside it there may only
            # be the revocation watch's Cancelled, when the connection is going away too.
            error = _lone_grpc_error(group)
            if error is None:
                raise
            raise error from error.__cause__
        if revoked:
            log.warning("ended the ADS stream of %s: certificate %x is revoked", identity, serial)
            raise GrpcError(
                StatusCode.PERMISSION_DENIED,
                f"client certificate {serial:x} ({identity}) is revoked",
            )

    return checked


def _lone_grpc_error(group: BaseExceptionGroup) -> GrpcError | None:
    """The group's one GrpcError if everything else in it is trio.Cancelled; else None."""
    leaves = list(_leaves(group))
    errors = [error for error in leaves if isinstance(error, GrpcError)]
    others = [error for error in leaves if not isinstance(error, (GrpcError, trio.Cancelled))]
    return errors[0] if len(errors) == 1 and not others else None


def _leaves(group: BaseExceptionGroup) -> Iterator[BaseException]:
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            yield from _leaves(error)
        else:
            yield error


class IdentityHandlers:
    """The handlers, by method path, for serve_grpc."""

    def __init__(self, authority: IdentityAuthority, registry: Registry, api_token: str) -> None:
        self.authority = authority
        self.registry = registry
        self.api_token = api_token

    def handlers(self) -> dict[str, Handler]:
        return {
            CREATE_CERTIFICATE_METHOD: self.create_certificate,
            DESCRIBE_JOIN_TOKEN_METHOD: self.describe_join_token,
            REGISTER_METHOD: self.register,
            DEREGISTER_METHOD: self.deregister,
        }

    async def _caller(self, stream: ServerStream) -> Caller:
        header = stream.metadata("authorization")
        if header is not None:
            scheme, _, presented = header.partition(" ")
            presented = presented.strip()
            if scheme.lower() != "bearer" or not presented:
                raise GrpcError(
                    StatusCode.UNAUTHENTICATED, "authorization metadata must be 'Bearer <token>'"
                )
            if is_join_token(presented):
                try:
                    token = await self.authority.check_join_token(presented)
                except JoinTokenError as error:
                    log.warning("refused a join token from %s: %s", stream.peer, error)
                    raise GrpcError(StatusCode.UNAUTHENTICATED, str(error)) from None
                except IdentityError as error:
                    raise GrpcError(StatusCode.UNAVAILABLE, error.message) from None
                identity = SpiffeId(
                    self.authority.ca.trust_domain, token.namespace, token.service_account
                )
                return Caller(
                    "join token", identity, f"join token {token.token_id} ({identity})", token
                )
            if hmac.compare_digest(presented.encode(), self.api_token.encode()):
                return Caller("operator", None, "the API token")
            log.warning(
                "refused a bearer token from %s: neither a join token nor the API token",
                stream.peer,
            )
            raise GrpcError(
                StatusCode.UNAUTHENTICATED,
                "the bearer token is neither a join token nor the API token",
            )
        try:
            found = peer_identity(stream, self.authority)
        except GrpcError as error:
            log.warning("refused a client certificate from %s: %s", stream.peer, error.message)
            raise
        if found is not None:
            identity, certificate = found
            return Caller("certificate", identity,
                          f"client certificate {certificate.serial_number:x} ({identity})")  # fmt: skip
        raise GrpcError(
            StatusCode.UNAUTHENTICATED,
            "no credentials: send 'authorization: Bearer <join token>' or connect with a client certificate",
        )

    async def create_certificate(self, stream: ServerStream) -> None:
        raw = await _single_request(stream)
        try:
            request = IstioCertificateRequest.FromString(raw)
        except DecodeError as error:
            raise GrpcError(
                StatusCode.INVALID_ARGUMENT, f"not an IstioCertificateRequest: {error}"
            ) from None
        caller = await self._caller(stream)
        try:
            csr = load_csr(request.csr)
        except CsrError as error:
            raise GrpcError(StatusCode.INVALID_ARGUMENT, str(error)) from None
        identity = caller.identity or _operator_identity(csr, self.authority.ca.trust_domain)
        node = _node_of(request)
        try:
            issued = await self.authority.issue(
                csr, identity, float(request.validity_duration), node
            )
        except CsrMismatch as error:
            log.warning(
                "refused a certificate to %s (%s): %s", caller.description, stream.peer, error
            )
            raise GrpcError(
                StatusCode.PERMISSION_DENIED, f"{error} (authorised by {caller.description})"
            ) from None
        except CsrError as error:
            raise GrpcError(StatusCode.INVALID_ARGUMENT, str(error)) from None
        except IdentityError as error:
            code = (
                StatusCode.UNAVAILABLE
                if error.code == "unavailable"
                else StatusCode.INVALID_ARGUMENT
            )
            raise GrpcError(code, error.message) from None
        await stream.send_message(
            IstioCertificateResponse(cert_chain=issued.chain_pem).SerializeToString()
        )

    async def describe_join_token(self, stream: ServerStream) -> None:
        """The identity the caller's join token grants and when the token expires (never its
        secret). The request is an empty Struct: the token travels in the metadata only."""
        raw = await _single_request(stream)
        try:
            fields = struct_pb2.Struct.FromString(raw).fields
        except DecodeError as error:
            raise GrpcError(
                StatusCode.INVALID_ARGUMENT, f"not a google.protobuf.Struct: {error}"
            ) from None
        if fields:
            raise GrpcError(StatusCode.INVALID_ARGUMENT,
                            f"{', '.join(sorted(fields))}: unknown field (the request is an empty "
                            "Struct; the join token goes in 'authorization: Bearer' metadata)")  # fmt: skip
        caller = await self._caller(stream)
        if caller.join_token is None or caller.identity is None:
            raise GrpcError(StatusCode.PERMISSION_DENIED,
                            f"JoinTokens/Describe answers for a join token, not {caller.description}: "
                            "send 'authorization: Bearer <join token>'")  # fmt: skip
        expires_at = datetime.datetime.fromtimestamp(caller.join_token.expires_at, datetime.UTC)
        log.info("told %s (%s) the identity its token grants", caller.description, stream.peer)
        await stream.send_message(JoinTokenGrant(caller.identity, expires_at).to_struct())

    async def register(self, stream: ServerStream) -> None:
        node_id, body = await self._registration(stream)
        caller = await self._caller(stream)
        identity = self._registering_identity(caller)

        def check(sidecar: Sidecar) -> None:
            if identity is not None and sidecar.namespace != identity.namespace:
                raise GrpcError(
                    StatusCode.PERMISSION_DENIED,
                    f"sidecar {node_id}: namespace {sidecar.namespace} is not the namespace of "
                    f"{caller.description}",
                )

        try:
            answer = await register(
                self.registry, node_id, body, str(identity) if identity else None, check
            )
        except ApiError as error:
            raise GrpcError(StatusCode.INVALID_ARGUMENT, error.message) from None
        await stream.send_message(_struct(answer))

    async def deregister(self, stream: ServerStream) -> None:
        node_id, _ = await self._registration(stream)
        caller = await self._caller(stream)
        identity = self._registering_identity(caller)
        known = self.registry.get(node_id)
        if identity is not None and known is not None and known.identity != str(identity):
            raise GrpcError(
                StatusCode.PERMISSION_DENIED,
                f"sidecar {node_id} was registered as {known.identity or 'no identity'}, not by {caller.description}",
            )
        try:
            answer = await deregister(self.registry, node_id)
        except ApiError as error:
            raise GrpcError(StatusCode.NOT_FOUND, error.message) from None
        await stream.send_message(_struct(answer))

    def _registering_identity(self, caller: Caller) -> SpiffeId | None:
        if caller.kind == "join token":
            raise GrpcError(
                StatusCode.PERMISSION_DENIED,
                "a join token only obtains a certificate; register with that certificate (or the API token)",
            )
        return caller.identity

    async def _registration(self, stream: ServerStream) -> tuple[str, bytes]:
        raw = await _single_request(stream)
        try:
            message = struct_pb2.Struct.FromString(raw)
        except DecodeError as error:
            raise GrpcError(
                StatusCode.INVALID_ARGUMENT, f"not a google.protobuf.Struct: {error}"
            ) from None
        body = _integral_numbers(json_format.MessageToDict(message))
        node_id = body.pop("nodeId", None)
        if not isinstance(node_id, str) or not node_id:
            raise GrpcError(StatusCode.INVALID_ARGUMENT, "nodeId: required (a string)")
        return node_id, json.dumps(body).encode()


def _operator_identity(csr: x509.CertificateSigningRequest, trust_domain: str) -> SpiffeId:
    """An operator's CSR names the identity it wants: exactly one URI SAN in our trust domain."""
    try:
        names = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = names.get_values_for_type(x509.UniformResourceIdentifier)
    except (x509.ExtensionNotFound, ValueError):
        uris = []
    if len(uris) != 1:
        raise GrpcError(
            StatusCode.INVALID_ARGUMENT, "the CSR must carry exactly one URI SAN (a SPIFFE ID)"
        )
    try:
        identity = SpiffeId.parse(uris[0])
    except SpiffeIdError as error:
        raise GrpcError(StatusCode.INVALID_ARGUMENT, f"the CSR's URI SAN: {error}") from None
    if identity.trust_domain != trust_domain:
        raise GrpcError(StatusCode.PERMISSION_DENIED,
                        f"CSR SAN mismatch: {identity} is not in trust domain {trust_domain}")  # fmt: skip
    return identity


def _node_of(request: Any) -> str | None:
    value = request.metadata.fields.get("nodeId") if request.HasField("metadata") else None
    return value.string_value or None if value is not None else None


async def _single_request(stream: ServerStream) -> bytes:
    raw = await stream.receive_message()
    if raw is None:
        raise GrpcError(StatusCode.INVALID_ARGUMENT, "the call carried no request message")
    return raw


def _struct(answer: dict[str, Any]) -> bytes:
    message = struct_pb2.Struct()
    message.update(answer)
    return message.SerializeToString()


def _integral_numbers(value: Any) -> Any:
    """A Struct holds every number as a double; ports and counts are integers again here."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _integral_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_integral_numbers(item) for item in value]
    return value
