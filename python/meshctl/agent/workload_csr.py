"""The workload's key pair and CSR, and what the agent reads back from the certificate it gets."""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID


class IssuedCertificateError(ValueError):
    """The CA answered with something that is not a usable certificate for our key and identity."""


def new_private_key() -> ec.EllipticCurvePrivateKey:
    """A fresh P-256 key; it lives in this process (and, if asked, in the cert dir) only."""
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def certificate_request(key: ec.EllipticCurvePrivateKey, spiffe_id: str) -> str:
    """A PEM CSR whose only identity is the URI SAN `spiffe_id` (an empty subject, as Istio's)."""
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        # An empty subject makes the SAN the identity, and RFC 5280 then wants it critical.
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
            critical=True,
        )
    )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


@dataclass(frozen=True)
class IssuedCertificate:
    """A certificate chain the CA issued for our key: leaf first, root last (as the CA sends it)."""

    chain_pem: tuple[str, ...]
    spiffe_id: str
    serial: str  # hex, as `meshctl identity list` shows it
    not_before: datetime.datetime
    not_after: datetime.datetime

    @property
    def lifetime(self) -> float:
        return (self.not_after - self.not_before).total_seconds()

    @property
    def leaf_and_intermediates_pem(self) -> bytes:
        """What a TLS peer is sent: the chain without its self-signed root (peers trust that)."""
        certificates = self.chain_pem[:-1] if len(self.chain_pem) > 1 else self.chain_pem
        return "".join(_with_newline(pem) for pem in certificates).encode()

    @property
    def root_pem(self) -> bytes:
        return _with_newline(self.chain_pem[-1]).encode()


def read_issued_chain(
    chain_pem: list[str], key: ec.EllipticCurvePrivateKey, expected_id: str | None
) -> IssuedCertificate:
    """Check that the leaf carries our public key and (if given) `expected_id`; read its dates."""
    if not chain_pem:
        raise IssuedCertificateError("the CA answered with an empty certificate chain")
    try:
        leaf = x509.load_pem_x509_certificate(chain_pem[0].encode())
    except ValueError as error:
        raise IssuedCertificateError(f"the CA's leaf certificate is not PEM: {error}") from None
    ours = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    theirs = leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if ours != theirs:
        raise IssuedCertificateError("the CA's certificate is not for the key this agent made")
    uris = spiffe_ids_of(leaf)
    if len(uris) != 1 or (expected_id is not None and uris[0] != expected_id):
        raise IssuedCertificateError(
            f"the CA's certificate names {uris or 'no URI SAN'}, expected {expected_id}"
        )
    return IssuedCertificate(
        chain_pem=tuple(chain_pem),
        spiffe_id=uris[0],
        serial=format(leaf.serial_number, "x"),
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
    )


def spiffe_ids_of(certificate: x509.Certificate) -> list[str]:
    try:
        names = certificate.extensions.get_extension_for_oid(
            ExtensionOID.SUBJECT_ALTERNATIVE_NAME
        ).value
    except x509.ExtensionNotFound:
        return []
    return list(names.get_values_for_type(x509.UniformResourceIdentifier))


def _with_newline(pem: str) -> str:
    return pem if pem.endswith("\n") else pem + "\n"
