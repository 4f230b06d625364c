"""A small test CA on `cryptography`: SPIFFE roots, intermediates and leaves, CRLs, and deliberately defective certificates."""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TRUST_DOMAIN = "cluster.local"
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

# Both usages, as Istio's CA issues workload certificates: a sidecar is client and server at once.
BOTH_USAGES = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)


def spiffe_id(
    service_account: str, namespace: str = "default", trust_domain: str = TRUST_DOMAIN
) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def rsa_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def pem(certificates: Iterable[x509.Certificate]) -> bytes:
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certificates)


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass
class Issued:
    """A certificate, the key it is presented with, and the intermediates sent along with it."""

    cert: x509.Certificate
    key: PrivateKey
    chain: list[x509.Certificate] = field(default_factory=list)

    @property
    def serial(self) -> int:
        return self.cert.serial_number

    def chain_pem(self) -> bytes:
        """Leaf first, then intermediates: what a TLS peer sends (Envoy's certificate_chain)."""
        return pem([self.cert, *self.chain])

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        """Write `<stem>.crt` (chain) and `<stem>.key` (0600) and return their paths."""
        cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
        cert_path.write_bytes(self.chain_pem())
        key_path.touch(mode=0o600)
        key_path.write_bytes(key_pem(self.key))
        return cert_path, key_path


@dataclass
class Leaf:
    """What goes into one leaf certificate; every field can be bent to make a defect."""

    uris: list[str] = field(default_factory=list)
    dns: list[str] = field(default_factory=list)
    usages: tuple[x509.ObjectIdentifier, ...] | None = BOTH_USAGES  # None: no EKU extension at all
    not_before: datetime.datetime | None = None
    not_after: datetime.datetime | None = None
    is_ca: bool = False
    key: PrivateKey | None = None
    signature_hash: hashes.HashAlgorithm | None = None  # None: SHA-256
    common_name: str | None = None


class CertificateAuthority:
    """A root or intermediate CA that issues leaves and intermediates and keeps a revocation list."""

    def __init__(
        self,
        name: str,
        *,
        parent: CertificateAuthority | None = None,
        key: PrivateKey | None = None,
        lifetime: datetime.timedelta = datetime.timedelta(days=30),
    ) -> None:
        self.name = name
        self.parent = parent
        self.key = key or ec_key()
        self.revoked: dict[int, datetime.datetime] = {}
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshctl tests"),
                x509.NameAttribute(NameOID.COMMON_NAME, name),
            ]
        )
        issuer_key = parent.key if parent else self.key
        issuer_name = parent.cert.subject if parent else subject
        start = now() - datetime.timedelta(hours=1)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer_name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + lifetime)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
        )
        if parent:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(parent.key.public_key()),
                critical=False,
            )
        self.cert = builder.sign(issuer_key, hashes.SHA256())

    @classmethod
    def root(
        cls, name: str = "meshctl test root", key: PrivateKey | None = None
    ) -> CertificateAuthority:
        return cls(name, key=key)

    def intermediate(self, name: str) -> CertificateAuthority:
        return CertificateAuthority(name, parent=self)

    @property
    def chain(self) -> list[x509.Certificate]:
        """Intermediates between a leaf of this CA and its root (this CA first, root excluded)."""
        if self.parent is None:
            return []
        return [self.cert, *self.parent.chain]

    def issue(self, leaf: Leaf, *, send_chain: bool = True) -> Issued:
        """Sign `leaf`; `send_chain=False` leaves the intermediates out of what the peer will send."""
        key = leaf.key or ec_key()
        start = leaf.not_before or now() - datetime.timedelta(minutes=5)
        end = leaf.not_after or now() + datetime.timedelta(hours=24)
        subject = x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, leaf.common_name)] if leaf.common_name else []
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=leaf.is_ca, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=True,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=leaf.is_ca,
                    crl_sign=leaf.is_ca,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri) for uri in leaf.uris]
        names += [x509.DNSName(dns) for dns in leaf.dns]
        if names:
            # Istio marks the SAN critical because the subject is empty (RFC 5280 4.2.1.6).
            builder = builder.add_extension(
                x509.SubjectAlternativeName(names), critical=not leaf.common_name
            )
        if leaf.usages is not None:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage(list(leaf.usages)), critical=False
            )
        if isinstance(leaf.signature_hash, hashes.SHA1):
            cert = _sign_with_sha1(builder.sign(self.key, hashes.SHA256()), self.key)
        else:
            cert = builder.sign(self.key, leaf.signature_hash or hashes.SHA256())
        return Issued(cert, key, self.chain if send_chain else [])

    def workload(self, identity: str, **leaf: object) -> Issued:
        """A well-formed workload certificate for one SPIFFE ID (keyword arguments bend the Leaf)."""
        return self.issue(Leaf(uris=[identity], **leaf))  # type: ignore[arg-type]

    def revoke(self, issued: Issued) -> None:
        self.revoked[issued.serial] = now() - datetime.timedelta(minutes=1)

    def crl(self) -> x509.CertificateRevocationList:
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now() - datetime.timedelta(minutes=5))
            .next_update(now() + datetime.timedelta(days=1))
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .add_extension(x509.CRLNumber(1), critical=False)
        )
        for serial, when in self.revoked.items():
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
            )
        return builder.sign(self.key, hashes.SHA256())

    def crl_pem(self) -> bytes:
        return self.crl().public_bytes(serialization.Encoding.PEM)


def operator_ca_files(directory: Path) -> tuple[CertificateAuthority, CertificateAuthority, dict[str, Path]]:
    """An operator's root and the intermediate it made for the mesh, written as `meshctl serve
    --ca-cert/--ca-key/--ca-chain` takes them: (root, intermediate, {"cert", "key", "chain"})."""
    root = CertificateAuthority.root("Operator Root")
    intermediate = root.intermediate("Operator Mesh CA")
    files = {
        "cert": directory / "mesh-ca.pem",
        "key": directory / "mesh-ca-key.pem",
        "chain": directory / "operator-root.pem",
    }
    files["cert"].write_bytes(pem([intermediate.cert]))
    files["key"].write_bytes(key_pem(intermediate.key))
    files["key"].chmod(0o600)
    files["chain"].write_bytes(pem([root.cert]))
    return root, intermediate, files


@dataclass
class TrustFiles:
    """The files a sidecar verifies peers with: the trusted roots and the CRLs of every CA in use."""

    ca: Path
    crl: Path


def write_trust(
    directory: Path,
    roots: list[CertificateAuthority],
    crl_issuers: list[CertificateAuthority],
    stem: str = "trust",
) -> TrustFiles:
    """Roots as one PEM bundle, CRLs (one per CA, concatenated) as another."""
    ca_path, crl_path = directory / f"{stem}-ca.pem", directory / f"{stem}-crl.pem"
    ca_path.write_bytes(pem(root.cert for root in roots))
    crl_path.write_bytes(b"".join(issuer.crl_pem() for issuer in crl_issuers))
    return TrustFiles(ca_path, crl_path)


# DER of the AlgorithmIdentifier OIDs; both are 9 bytes long, so swapping them keeps every length.
_SHA256_WITH_RSA = bytes.fromhex("06092a864886f70d01010b")
_SHA1_WITH_RSA = bytes.fromhex("06092a864886f70d010105")


def _der_length(length: int) -> bytes:
    if length < 0x80:
        return bytes([length])
    encoded = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(encoded)]) + encoded


def _sign_with_sha1(cert: x509.Certificate, issuer_key: PrivateKey) -> x509.Certificate:
    """Re-sign `cert` with sha1WithRSAEncryption, which `cryptography` no longer signs with itself."""
    if not isinstance(issuer_key, rsa.RSAPrivateKey):
        raise TypeError("a SHA-1 signature needs an RSA issuer")
    tbs = cert.tbs_certificate_bytes
    if tbs.count(_SHA256_WITH_RSA) != 1:
        raise ValueError("expected exactly one sha256WithRSAEncryption in the TBS certificate")
    tbs = tbs.replace(_SHA256_WITH_RSA, _SHA1_WITH_RSA)
    signature = issuer_key.sign(tbs, padding.PKCS1v15(), hashes.SHA1())
    algorithm = b"\x30\x0d" + _SHA1_WITH_RSA + b"\x05\x00"
    bit_string = b"\x03" + _der_length(len(signature) + 1) + b"\x00" + signature
    body = tbs + algorithm + bit_string
    return x509.load_der_x509_certificate(b"\x30" + _der_length(len(body)) + body)


# --- the negative matrix ---------------------------------------------------------------------


@dataclass
class Defect:
    """One deliberately wrong certificate and what is wrong with it."""

    name: str
    issued: Issued
    why: str
    # Some defects cannot even be loaded by a standards-following TLS stack (a key that does not
    # match its certificate): such a certificate is refused by whoever is asked to present it.
    presentable: bool = True


@dataclass
class MatrixPki:
    """The CAs of a matrix: the trusted root, its intermediate, and a foreign root nobody trusts."""

    root: CertificateAuthority
    intermediate: CertificateAuthority
    foreign: CertificateAuthority

    @classmethod
    def create(cls) -> MatrixPki:
        # An RSA root, so that a SHA-1 signature can be made (see _sign_with_sha1).
        root = CertificateAuthority.root("meshctl test root", key=rsa_key(2048))
        return cls(
            root,
            root.intermediate("meshctl test intermediate"),
            CertificateAuthority.root("foreign root"),
        )


def positive_controls(pki: MatrixPki, identity: str) -> dict[str, Issued]:
    """Certificates for `identity` that must be accepted."""
    return {
        "good-ec-from-root": pki.root.workload(identity),
        "good-via-intermediate": pki.intermediate.workload(identity),
        "good-rsa2048": pki.root.workload(identity, key=rsa_key(2048)),
        "good-no-eku": pki.root.workload(identity, usages=None),
    }


def defects(pki: MatrixPki, identity: str, *, role: str) -> list[Defect]:
    """Every defect for a certificate that should have been `identity`; `role` is "client" or "server"."""
    if role not in ("client", "server"):
        raise ValueError(f"role must be client or server, not {role!r}")
    root = pki.root
    td_prefix = f"spiffe://{TRUST_DOMAIN}/"
    path = identity.removeprefix(td_prefix)  # "ns/default/sa/NAME"
    other_sa = identity.rsplit("/", 1)[0] + "/intruder"
    missing_usage = (
        ExtendedKeyUsageOID.CLIENT_AUTH if role == "client" else ExtendedKeyUsageOID.SERVER_AUTH
    )
    wrong_usage_only = tuple(u for u in BOTH_USAGES if u != missing_usage)
    revoked = root.workload(identity)
    root.revoke(revoked)
    mismatched = root.workload(identity)
    mismatched = Issued(mismatched.cert, ec_key(), mismatched.chain)
    wrong_key_issuer = CertificateAuthority("intermediate outside the chain", parent=root)
    hours = datetime.timedelta(hours=1)
    result = [
        Defect(
            "expired",
            root.workload(identity, not_before=now() - 48 * hours, not_after=now() - hours),
            "notAfter one hour ago",
        ),
        Defect(
            "not-yet-valid",
            root.workload(identity, not_before=now() + hours, not_after=now() + 48 * hours),
            "notBefore one hour ahead",
        ),
        Defect(
            "wrong-trust-domain",
            root.workload(f"spiffe://evil.local/{path}"),
            "spiffe://evil.local/...",
        ),
        Defect("wrong-service-account", root.workload(other_sa), "same namespace, sa/intruder"),
        Defect(
            "foreign-ca",
            pki.foreign.workload(identity),
            "right SPIFFE ID, signed by an untrusted root",
        ),
        Defect(
            "two-uri-sans",
            root.issue(Leaf(uris=[identity, other_sa])),
            "the expected ID plus a second URI SAN (an SVID has exactly one)",
        ),
        Defect(
            "dns-san-only",
            root.issue(Leaf(dns=[f"{identity.rsplit('/', 1)[1]}.default.svc.cluster.local"])),
            "DNS SAN, no URI SAN",
        ),
        Defect(
            "no-san",
            root.issue(Leaf(common_name=identity)),
            "no SAN at all; the ID only in the subject CN",
        ),
        Defect(
            "ca-as-leaf",
            root.workload(identity, is_ca=True),
            "basicConstraints CA:TRUE presented as a leaf",
        ),
        Defect(
            f"eku-without-{role}Auth",
            root.workload(identity, usages=wrong_usage_only),
            f"extendedKeyUsage lacks {role}Auth",
        ),
        Defect("revoked", revoked, "serial listed in the root's CRL"),
        Defect(
            "nul-in-uri-san",
            root.workload(identity + "\x00.evil.local"),
            "URI SAN is the expected ID, a NUL byte, then more",
        ),
        Defect(
            "non-spiffe-uri",
            root.workload("https://" + identity.removeprefix("spiffe://")),
            "https:// URI with the right path",
        ),
        Defect(
            "intermediate-not-sent",
            wrong_key_issuer.issue(Leaf(uris=[identity]), send_chain=False),
            "signed by an intermediate the peer never sends",
        ),
        Defect(
            "key-does-not-match",
            mismatched,
            "private key of another certificate",
            presentable=False,
        ),
        Defect(
            "sha1-signature",
            root.workload(identity, signature_hash=hashes.SHA1()),
            "leaf signed with sha1WithRSAEncryption",
        ),
        Defect("rsa-1024", root.workload(identity, key=rsa_key(1024)), "1024-bit RSA key"),
        Defect(
            "expired-intermediate",
            _expired_intermediate(root).workload(identity),
            "leaf is fine, the intermediate it is sent with expired",
        ),
    ]
    return result


def _expired_intermediate(root: CertificateAuthority) -> CertificateAuthority:
    ca = CertificateAuthority(
        "expired intermediate", parent=root, lifetime=datetime.timedelta(minutes=30)
    )
    # Re-sign the intermediate with a window entirely in the past; leaves stay within their own window.
    start = now() - datetime.timedelta(days=2)
    ca.cert = (
        x509.CertificateBuilder()
        .subject_name(ca.cert.subject)
        .issuer_name(root.cert.subject)
        .public_key(ca.key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca.key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root.key.public_key()),
            critical=False,
        )
        .sign(root.key, hashes.SHA256())
    )
    return ca
