"""The control plane's certificate authority: its roots (generated or the operator's), leaf and server
certificates, root rotation with an overlap, and the trust bundle sidecars verify against.

The CA directory (`<data dir>/ca/`, mode 0700) holds, for a generated root:

    root-cert.pem, root-key.pem                     the root that signs new certificates
    previous-root-cert.pem, previous-root-key.pem   during a rotation: the old root, still trusted
    rotation.json                                   {"overlapUntil": epoch seconds} during a rotation
    root-bundle.pem                                 the trusted roots, for local sidecars (public)

Keys are written 0600 and atomically. An operator-supplied CA (`--ca-cert/--ca-key/--ca-chain`)
is read from the operator's files and never copied; only root-bundle.pem is written then.
"""

from __future__ import annotations

import datetime
import fcntl
import ipaddress
import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshctl.identity.files import KeyFileError, read_private_key_file, write_atomically
from meshctl.identity.spiffe import SpiffeId

DEFAULT_CERT_TTL = 24 * 3600.0
MIN_CERT_TTL = 60.0
ROOT_VALIDITY = datetime.timedelta(days=3650)
# Leaves start a little in the past: a sidecar whose clock is slightly behind ours must not see
# a certificate that is "not yet valid".
BACKDATE = datetime.timedelta(minutes=5)
SERVER_CERT_TTL = 24 * 3600.0
DEFAULT_OVERLAP = 24 * 3600.0

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def control_plane_id(trust_domain: str) -> str:
    """The URI SAN of the control plane's server certificate. Not of the workload form
    (spiffe://TD/ns/NS/sa/SA), so no CSR, join token or operator can be issued it."""
    return f"spiffe://{trust_domain}/meshctl/control-plane"


class CaError(Exception):
    """A CA that cannot be loaded or an operation it refuses; str() says which file or why."""


class CsrError(ValueError):
    """A CSR that cannot be signed; str() names what is wrong with it."""


class CsrMismatch(CsrError):
    """A well-formed CSR asking for an identity other than the one its caller may have."""


@dataclass(frozen=True)
class Signer:
    """A CA certificate and its key, and the certificates above it up to the root (root last;
    empty when it is the root itself)."""

    certificate: x509.Certificate
    key: PrivateKey
    above: tuple[x509.Certificate, ...] = ()

    @property
    def root(self) -> x509.Certificate:
        return self.above[-1] if self.above else self.certificate

    @property
    def key_id(self) -> str:
        """Hex subject key identifier: which signer issued a certificate (and whose CRL lists it)."""
        return _key_id(self.certificate).hex()

    def chain_above_leaf(self) -> list[x509.Certificate]:
        """What follows a leaf in its chain: this CA, intermediates, the root last."""
        return [self.certificate, *self.above]


@dataclass(frozen=True)
class IssuedCertificate:
    serial: int
    spiffe_id: str
    not_after: float  # epoch seconds
    issuer: str  # the signer's key id
    chain_pem: list[str]  # leaf, intermediates..., root last

    @property
    def serial_hex(self) -> str:
        return format(self.serial, "x")


class CertificateAuthority:
    """Signs leaves with the current signer; trusts the current root and, during a rotation, the
    previous one. Not thread-safe; the control plane calls it from its trio thread."""

    def __init__(
        self,
        directory: Path,
        trust_domain: str,
        signer: Signer,
        *,
        previous: Signer | None = None,
        overlap_until: float | None = None,
        operator_supplied: bool = False,
    ) -> None:
        self.directory = directory
        self.trust_domain = trust_domain
        self.signer = signer
        self.previous = previous
        self.overlap_until = overlap_until
        self.operator_supplied = operator_supplied

    # --- loading -----------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        directory: Path,
        trust_domain: str,
        *,
        ca_cert: Path | None = None,
        ca_key: Path | None = None,
        ca_chain: Path | None = None,
    ) -> CertificateAuthority:
        """The operator's CA if ca_cert/ca_key are given, else the root in `directory`, generated
        on first use. Writes root-bundle.pem. CaError names the file and the problem."""
        directory = directory.expanduser()
        # The data dir too is private (it holds the API token and the store): mkdir(parents=True)
        # would make it with the umask's mode.
        directory.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        directory.mkdir(exist_ok=True, mode=0o700)
        if ca_cert is not None or ca_key is not None:
            if ca_cert is None or ca_key is None:
                raise CaError("--ca-cert and --ca-key go together: give both, or neither")
            ca = cls(directory, trust_domain, _operator_signer(ca_cert, ca_key, ca_chain),
                     operator_supplied=True)  # fmt: skip
        elif ca_chain is not None:
            raise CaError("--ca-chain needs --ca-cert and --ca-key")
        else:
            with _locked(directory):
                ca = cls._load_generated(directory, trust_domain)
        ca.write_bundle()
        return ca

    @classmethod
    def _load_generated(cls, directory: Path, trust_domain: str) -> CertificateAuthority:
        current = _load_pair(directory, "root")
        if current is None:
            current = _new_root(trust_domain)
            _save_pair(directory, "root", current)
        previous = _load_pair(directory, "previous-root")
        overlap_until = None
        rotation = directory / "rotation.json"
        if previous is not None:
            try:
                overlap_until = float(json.loads(rotation.read_text())["overlapUntil"])
            except (OSError, ValueError, KeyError, TypeError):
                overlap_until = None  # no deadline known: trusted until `rotate --finish`
        return cls(directory, trust_domain, current, previous=previous, overlap_until=overlap_until)

    # --- what others trust ------------------------------------------------------------------

    def roots(self) -> list[x509.Certificate]:
        """The trust bundle: the current root first, then the previous one during a rotation."""
        roots = [self.signer.root]
        if self.previous is not None and self.previous.root != self.signer.root:
            roots.append(self.previous.root)
        return roots

    def signers(self) -> list[Signer]:
        return [self.signer] + ([self.previous] if self.previous is not None else [])

    def bundle_pem(self) -> str:
        return "".join(_pem(root) for root in self.roots())

    def write_bundle(self) -> Path:
        path = self.directory / "root-bundle.pem"
        write_atomically(path, self.bundle_pem().encode(), 0o644)  # public: sidecars read it
        return path

    # --- issuing -----------------------------------------------------------------------------

    def sign_csr(
        self, csr: x509.CertificateSigningRequest, spiffe_id: SpiffeId, ttl: float
    ) -> IssuedCertificate:
        """A leaf for `spiffe_id` with the CSR's public key, valid for `ttl` seconds (never past
        the signer's own expiry). The CSR must be self-signed and name exactly `spiffe_id`."""
        check_csr(csr, spiffe_id)
        now = _now()
        not_after = min(
            now + datetime.timedelta(seconds=ttl), self.signer.certificate.not_valid_after_utc
        )
        certificate = (
            _builder(self.signer, csr.public_key(), now, not_after)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(spiffe_id))]),
                critical=True,  # the subject is empty, so the SAN carries the identity (RFC 5280)
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .sign(self.signer.key, _hash_for(self.signer.key))
        )
        return IssuedCertificate(
            serial=certificate.serial_number,
            spiffe_id=str(spiffe_id),
            not_after=certificate.not_valid_after_utc.timestamp(),
            issuer=self.signer.key_id,
            chain_pem=[_pem(certificate), *(_pem(c) for c in self.signer.chain_above_leaf())],
        )

    def server_certificate(
        self, names: Iterable[str], ttl: float = SERVER_CERT_TTL
    ) -> tuple[bytes, bytes, float]:
        """(chain PEM, private key PEM, not_after) for the control plane's own TLS port: DNS and IP
        SANs for `names`, and the plane's URI SAN (control_plane_id), by which sidecars' engines
        (which match peers by URI only) tell the plane from a workload. The key is made here and
        lives only in memory.

        During a rotation it is signed by the previous root: every sidecar still trusts that one
        (those started before the rotation know no other), until the rotation is finished."""
        signer = self.previous or self.signer
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        not_after = min(
            now + datetime.timedelta(seconds=ttl), signer.certificate.not_valid_after_utc
        )
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(control_plane_id(self.trust_domain))]
        for name in dict.fromkeys(names):
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        certificate = (
            _builder(signer, key.public_key(), now, not_after)
            .add_extension(x509.SubjectAlternativeName(sans), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(signer.key, _hash_for(signer.key))
        )
        chain = "".join(_pem(c) for c in [certificate, *signer.chain_above_leaf()]).encode()
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return chain, key_pem, not_after.timestamp()

    # --- rotation ----------------------------------------------------------------------------

    def rotate(self, overlap: float = DEFAULT_OVERLAP) -> None:
        """Make a new root that signs from now on; the current one stays trusted for `overlap`
        seconds or until finish_rotation(). Refused while a rotation is under way."""
        self._check_rotatable()
        if self.previous is not None:
            raise CaError(
                "a root rotation is already under way; finish it first (meshctl identity root rotate --finish)"
            )
        with _locked(self.directory):
            new = _new_root(self.trust_domain)
            _save_pair(self.directory, "previous-root", self.signer)
            write_atomically(self.directory / "rotation.json",
                             json.dumps({"overlapUntil": time.time() + overlap}).encode(), 0o600)  # fmt: skip
            _save_pair(self.directory, "root", new)
        self.previous, self.signer = self.signer, new
        self.overlap_until = time.time() + overlap
        self.write_bundle()

    def finish_rotation(self) -> None:
        """Stop trusting the previous root (certificates it signed stop working)."""
        self._check_rotatable()
        if self.previous is None:
            raise CaError(
                "no root rotation is under way (start one with meshctl identity root rotate)"
            )
        with _locked(self.directory):
            for name in ("previous-root-cert.pem", "previous-root-key.pem", "rotation.json"):
                (self.directory / name).unlink(missing_ok=True)
        self.previous = None
        self.overlap_until = None
        self.write_bundle()

    def overlap_over(self, now: float | None = None) -> bool:
        """Whether a rotation's overlap has elapsed (the caller then finishes it)."""
        if self.previous is None or self.overlap_until is None:
            return False
        return (time.time() if now is None else now) >= self.overlap_until

    def _check_rotatable(self) -> None:
        if self.operator_supplied:
            raise CaError(
                "this control plane signs with an operator-supplied CA (--ca-cert/--ca-key): rotate "
                "it by restarting with the new one"
            )

    # --- sharing between control planes ------------------------------------------------------

    def shared_state(self) -> dict[str, Any]:
        """The generated roots (keys included) and the rotation, as JSON: what planes on one etcd
        store keep there so they all sign with, and trust, the same roots."""
        return {
            "root": _pair_json(self.signer),
            "previous": _pair_json(self.previous) if self.previous is not None else None,
            "overlapUntil": self.overlap_until if self.previous is not None else None,
        }

    def adopt(self, state: dict[str, Any]) -> bool:
        """Take the roots another plane stored (written to this plane's CA directory too); True
        when they differ from ours. CaError if the state is malformed."""
        try:
            current = _pair_from_json(state["root"])
            previous = _pair_from_json(state["previous"]) if state.get("previous") else None
            overlap_until = float(state["overlapUntil"]) if state.get("overlapUntil") else None
        except (KeyError, TypeError, ValueError) as error:
            raise CaError(f"the shared CA state is malformed ({type(error).__name__})") from None
        same_previous = (previous is None and self.previous is None) or (
            previous is not None
            and self.previous is not None
            and previous.certificate == self.previous.certificate
        )
        if current.certificate == self.signer.certificate and same_previous:
            return False
        with _locked(self.directory):
            _save_pair(self.directory, "root", current)
            if previous is not None:
                _save_pair(self.directory, "previous-root", previous)
                rotation = json.dumps({"overlapUntil": overlap_until}).encode()
                write_atomically(self.directory / "rotation.json", rotation, 0o600)
            else:
                for name in ("previous-root-cert.pem", "previous-root-key.pem", "rotation.json"):
                    (self.directory / name).unlink(missing_ok=True)
        self.signer, self.previous, self.overlap_until = current, previous, overlap_until
        self.write_bundle()
        return True

    # --- revocation lists -----------------------------------------------------------------------

    def crls_pem(
        self,
        revoked: Mapping[str, Sequence[tuple[int, float]]],
        number: int | None = None,
        lifetime: float = 4 * 3600.0,
    ) -> str:
        """One CRL per signer, signed by it, listing its revoked serials: `revoked` maps a signer's
        key id to (serial, revoked at). Concatenated PEM, current signer first."""
        now = _now()
        number = number if number is not None else int(time.time() * 1000)
        parts = []
        for signer in self.signers():
            builder = (
                x509.CertificateRevocationListBuilder()
                .issuer_name(signer.certificate.subject)
                .last_update(now - BACKDATE)
                .next_update(now + datetime.timedelta(seconds=lifetime))
                .add_extension(x509.CRLNumber(number), critical=False)
                .add_extension(
                    x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.key.public_key()),
                    critical=False,
                )
            )
            for serial, revoked_at in sorted(revoked.get(signer.key_id, ())):
                builder = builder.add_revoked_certificate(
                    x509.RevokedCertificateBuilder()
                    .serial_number(serial)
                    .revocation_date(datetime.datetime.fromtimestamp(revoked_at, datetime.UTC))
                    .build()
                )
            crl = builder.sign(signer.key, _hash_for(signer.key))
            parts.append(crl.public_bytes(serialization.Encoding.PEM).decode())
        return "".join(parts)


def check_csr(csr: x509.CertificateSigningRequest, spiffe_id: SpiffeId) -> None:
    """CsrError unless the CSR is self-signed, has an acceptable key and exactly one SAN, the URI
    `spiffe_id`."""
    if not csr.is_signature_valid:
        raise CsrError("the CSR's signature does not verify (it was not signed by its own key)")
    key = csr.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise CsrError(f"the CSR's RSA key has {key.key_size} bits; at least 2048 are needed")
    elif isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ("secp256r1", "secp384r1"):
            raise CsrError(f"the CSR's EC key is on {key.curve.name}; use P-256 or P-384")
    elif not isinstance(key, ed25519.Ed25519PublicKey):
        raise CsrError(
            f"the CSR's key type {type(key).__name__} is not supported (EC, RSA, Ed25519)"
        )
    try:
        names = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CsrMismatch(
            f"the CSR has no subjectAltName; it must carry the URI SAN {spiffe_id}"
        ) from None
    except ValueError as error:
        raise CsrError(f"the CSR's extensions cannot be parsed: {error}") from None
    uris = names.get_values_for_type(x509.UniformResourceIdentifier)
    if len(list(names)) != 1 or len(uris) != 1:
        raise CsrMismatch(
            f"the CSR must carry exactly one SAN, the URI {spiffe_id}; it has "
            + ", ".join(_describe_name(name) for name in names)
        )
    if uris[0] != str(spiffe_id):
        raise CsrMismatch(
            f"CSR SAN mismatch: it asks for {uris[0]!r}, but this caller may only get {spiffe_id}"
        )


def load_csr(pem: str) -> x509.CertificateSigningRequest:
    try:
        return x509.load_pem_x509_csr(pem.encode())
    except (ValueError, UnicodeEncodeError) as error:
        raise CsrError(f"the csr field is not a PEM certificate request: {error}") from None


def fingerprint(certificate: x509.Certificate) -> str:
    """SHA-256 fingerprint, colon-separated hex (as openssl x509 -fingerprint prints it)."""
    return certificate.fingerprint(hashes.SHA256()).hex(":").upper()


def uri_sans(certificate: x509.Certificate) -> list[str]:
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return names.get_values_for_type(x509.UniformResourceIdentifier)


# --- helpers ----------------------------------------------------------------------------------


def _describe_name(name: x509.GeneralName) -> str:
    return f"{type(name).__name__} {name.value!r}"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _pem(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


def _hash_for(key: PrivateKey) -> hashes.HashAlgorithm | None:
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def _key_id(certificate: x509.Certificate) -> bytes:
    try:
        return certificate.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier
        ).value.digest
    except x509.ExtensionNotFound:
        return x509.SubjectKeyIdentifier.from_public_key(certificate.public_key()).digest


def _builder(
    signer: Signer, public_key, now: datetime.datetime, not_after: datetime.datetime
) -> x509.CertificateBuilder:
    """A leaf's common part: empty subject, random serial, backdated start, CA=false, key usages."""
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(signer.certificate.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_encipherment=True,
                content_commitment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                x509.SubjectKeyIdentifier(_key_id(signer.certificate))
            ),
            critical=False,
        )
    )


def _new_root(trust_domain: str) -> Signer:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    # A distinct name per root: during a rotation verifiers hold two roots and two CRLs, and
    # match each certificate and CRL to its issuer by name first.
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
        x509.NameAttribute(NameOID.COMMON_NAME, f"meshctl root CA {now:%Y-%m-%dT%H:%M:%S}Z {os.urandom(3).hex()}"),
    ])  # fmt: skip
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + ROOT_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Signer(certificate, key)


def _save_pair(directory: Path, stem: str, signer: Signer) -> None:
    key_pem = signer.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_atomically(directory / f"{stem}-key.pem", key_pem, 0o600)
    write_atomically(directory / f"{stem}-cert.pem", _pem(signer.certificate).encode(), 0o644)


def _pair_json(signer: Signer) -> dict[str, str]:
    key_pem = signer.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return {"cert": _pem(signer.certificate), "key": key_pem.decode()}


def _pair_from_json(pair: dict[str, str]) -> Signer:
    certificate = x509.load_pem_x509_certificate(pair["cert"].encode())
    key = serialization.load_pem_private_key(pair["key"].encode(), password=None)
    if not isinstance(
        key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)
    ):
        raise TypeError("unsupported key type")
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if certificate.public_key().public_bytes(*raw) != key.public_key().public_bytes(*raw):
        raise ValueError("the key does not match the certificate")
    return Signer(certificate, key)


def _load_pair(directory: Path, stem: str) -> Signer | None:
    cert_path, key_path = directory / f"{stem}-cert.pem", directory / f"{stem}-key.pem"
    if not cert_path.exists() and not key_path.exists():
        return None
    if not cert_path.exists() or not key_path.exists():
        missing = cert_path if not cert_path.exists() else key_path
        raise CaError(f"the CA in {directory} is incomplete: {missing.name} is missing")
    certificate = _read_certificates(cert_path)[0]
    key = _read_key(key_path)
    _check_key_matches(certificate, key, cert_path, key_path)
    return Signer(certificate, key)


def _operator_signer(cert_path: Path, key_path: Path, chain_path: Path | None) -> Signer:
    certificates = _read_certificates(cert_path)
    certificate = certificates[0]
    key = _read_key(key_path)
    _check_key_matches(certificate, key, cert_path, key_path)
    _check_is_ca(certificate, cert_path)
    # Issuers may follow the CA certificate in its own file, or come in --ca-chain.
    above = certificates[1:] + (_read_certificates(chain_path) if chain_path is not None else [])
    below = certificate
    for position, issuer in enumerate(above):
        where = f"{chain_path or cert_path} certificate {position + 1}"
        _check_is_ca(issuer, Path(where))
        try:
            below.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature):
            raise CaError(f"{where} ({issuer.subject.rfc4514_string()}) did not issue "
                          f"{below.subject.rfc4514_string()}; give the chain in order, root last") from None  # fmt: skip
        below = issuer
    if below.subject != below.issuer:
        raise CaError(
            f"{cert_path} is an intermediate CA ({certificate.subject.rfc4514_string()}): give --ca-chain "
            "with its issuers up to and including the self-signed root"
        )
    now = _now()
    for item in [certificate, *above]:
        if item.not_valid_after_utc <= now:
            raise CaError(
                f"CA certificate {item.subject.rfc4514_string()} expired on {item.not_valid_after_utc:%Y-%m-%d}"
            )
    return Signer(certificate, key, tuple(above))


def _read_certificates(path: Path) -> list[x509.Certificate]:
    try:
        certificates = x509.load_pem_x509_certificates(path.read_bytes())
    except OSError as error:
        raise CaError(f"cannot read {path}: {error.strerror or error}") from None
    except ValueError as error:
        raise CaError(f"{path} holds no PEM certificate: {error}") from None
    return certificates


def _read_key(path: Path) -> PrivateKey:
    try:
        data = read_private_key_file(path)
        key = serialization.load_pem_private_key(data, password=None)
    except KeyFileError as error:
        raise CaError(str(error)) from None
    except (ValueError, TypeError) as error:
        # The message never quotes the file: it is key material.
        raise CaError(
            f"{path} is not an unencrypted PEM private key ({type(error).__name__})"
        ) from None
    if not isinstance(
        key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)
    ):
        raise CaError(f"{path}: key type {type(key).__name__} is not supported (EC, RSA, Ed25519)")
    return key


def _check_key_matches(
    certificate: x509.Certificate, key: PrivateKey, cert_path: Path, key_path: Path
) -> None:
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if certificate.public_key().public_bytes(*raw) != key.public_key().public_bytes(*raw):
        raise CaError(f"{key_path} is not the private key of the certificate in {cert_path}")


def _check_is_ca(certificate: x509.Certificate, where: Path) -> None:
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise CaError(
            f"{where}: {certificate.subject.rfc4514_string()} is not a CA certificate (basicConstraints CA=true)"
        )


class _locked:
    """An exclusive lock on the CA directory: two planes starting on one data dir make one root."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / ".lock"

    def __enter__(self) -> None:
        self.descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.descriptor, fcntl.LOCK_EX)

    def __exit__(self, *_exc: object) -> None:
        os.close(self.descriptor)
