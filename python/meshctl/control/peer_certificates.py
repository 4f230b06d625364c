"""Who a client certificate the TLS handshake verified says its holder is: exactly one SPIFFE ID in
our trust domain, unexpired and unrevoked. Shared by the xDS/CA port (gRPC) and the REST API."""

from __future__ import annotations

import time
from dataclasses import dataclass

from cryptography import x509

from meshctl.control.identity_authority import IdentityAuthority
from meshctl.identity.ca import uri_sans
from meshctl.identity.spiffe import SpiffeId, SpiffeIdError


class PeerCertificateError(Exception):
    """Why a verified certificate names no usable identity. `reason` lets each port choose its
    status: "foreign" (no single SPIFFE ID of our trust domain), "expired", "revoked"."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


@dataclass(frozen=True)
class PeerCertificate:
    identity: SpiffeId
    certificate: x509.Certificate

    @property
    def serial(self) -> str:
        return format(self.certificate.serial_number, "x")

    def describe(self) -> str:
        return f"client certificate {self.serial} ({self.identity})"


def certificate_identity(der: bytes, authority: IdentityAuthority) -> PeerCertificate:
    """The identity of the DER client certificate (already verified against the trust bundle by
    the handshake); PeerCertificateError if it names none we accept, has expired or is revoked."""
    certificate = x509.load_der_x509_certificate(der)
    serial = format(certificate.serial_number, "x")
    uris = uri_sans(certificate)
    if len(uris) != 1:
        raise PeerCertificateError(
            "foreign", f"client certificate {serial} must carry exactly one URI SAN"
        )
    try:
        identity = SpiffeId.parse(uris[0])
    except SpiffeIdError as error:
        raise PeerCertificateError("foreign", f"client certificate {serial}: {error}") from None
    if identity.trust_domain != authority.ca.trust_domain:
        raise PeerCertificateError("foreign",
                                   f"client certificate {serial} is for trust domain {identity.trust_domain}, "
                                   f"not {authority.ca.trust_domain}")  # fmt: skip
    if certificate.not_valid_after_utc.timestamp() <= time.time():
        raise PeerCertificateError(
            "expired", f"client certificate {serial} ({identity}) has expired"
        )
    if authority.revoked_serial(certificate.serial_number):
        raise PeerCertificateError(
            "revoked", f"client certificate {serial} ({identity}) is revoked"
        )
    return PeerCertificate(identity, certificate)
