"""The CA, SPIFFE IDs and join tokens on their own: key files, what issued certificates carry,
operator-supplied intermediates, rotation bundles and CRLs."""

from __future__ import annotations

import datetime
import stat
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store
from helpers.pki import operator_ca_files

from meshctl.identity import tokens
from meshctl.identity.ca import CaError, CertificateAuthority, CsrError, CsrMismatch
from meshctl.identity.spiffe import SpiffeId, SpiffeIdError

ALICE = SpiffeId("cluster.local", "default", "alice")


def make_csr(*uris: str, key=None, dns: tuple[str, ...] = ()) -> x509.CertificateSigningRequest:
    key = key or ec.generate_private_key(ec.SECP256R1())
    names = [x509.UniformResourceIdentifier(uri) for uri in uris] + [
        x509.DNSName(name) for name in dns
    ]
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=True)
    return builder.sign(key, hashes.SHA256())


def leaf_of(issued) -> x509.Certificate:
    return x509.load_pem_x509_certificate(issued.chain_pem[0].encode())


def verify_client(leaf: x509.Certificate, roots: list[x509.Certificate], chain=()) -> None:
    """A full RFC 5280 client-certificate verification (cryptography's verifier, not ours)."""
    verifier = PolicyBuilder().store(Store(roots)).build_client_verifier()
    verified = verifier.verify(leaf, list(chain))
    assert [str(name.value) for name in verified.subjects] == [str(ALICE)]


@pytest.fixture
def ca(tmp_path) -> CertificateAuthority:
    return CertificateAuthority.open(tmp_path / "ca", "cluster.local")


def test_a_generated_root_key_is_0600_and_reused_at_the_next_start(tmp_path, ca):
    directory = tmp_path / "ca"
    assert stat.S_IMODE((directory / "root-key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert not any(path.name.endswith(".tmp") for path in directory.iterdir())
    key = serialization.load_pem_private_key((directory / "root-key.pem").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    again = CertificateAuthority.open(directory, "cluster.local")
    assert again.signer.root == ca.signer.root
    bundle = x509.load_pem_x509_certificates((directory / "root-bundle.pem").read_bytes())
    assert bundle == [ca.signer.root]


def test_a_root_key_readable_by_others_is_refused(tmp_path, ca):
    (tmp_path / "ca" / "root-key.pem").chmod(0o644)
    with pytest.raises(CaError, match="accessible by others.*chmod 600"):
        CertificateAuthority.open(tmp_path / "ca", "cluster.local")


def test_an_issued_leaf_carries_exactly_the_spiffe_id_and_the_mesh_usages(ca):
    before = datetime.datetime.now(datetime.UTC)
    issued = ca.sign_csr(make_csr(str(ALICE)), ALICE, 3600)
    leaf = leaf_of(issued)
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert sans.critical and list(sans.value) == [x509.UniformResourceIdentifier(str(ALICE))]
    usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    key_usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert (
        key_usage.digital_signature and key_usage.key_encipherment and not key_usage.key_cert_sign
    )
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert leaf.not_valid_before_utc < before  # backdated for clock skew
    assert abs((leaf.not_valid_after_utc - before).total_seconds() - 3600) < 5
    assert leaf.serial_number == issued.serial and issued.serial.bit_length() > 64
    assert len(issued.chain_pem) == 2  # leaf, root
    verify_client(leaf, [ca.signer.root])
    assert ca.sign_csr(make_csr(str(ALICE)), ALICE, 60).serial != issued.serial


@pytest.mark.parametrize(
    ("uris", "dns", "error", "message"),
    [
        (
            ("spiffe://cluster.local/ns/default/sa/bob",),
            (),
            CsrMismatch,
            "CSR SAN mismatch.*bob.*alice",
        ),
        (
            (str(ALICE), "spiffe://cluster.local/ns/default/sa/bob"),
            (),
            CsrMismatch,
            "exactly one SAN",
        ),
        ((str(ALICE),), ("alice.example",), CsrMismatch, "exactly one SAN"),
        ((), (), CsrMismatch, "no subjectAltName"),
    ],
)
def test_a_csr_must_name_exactly_the_authorised_identity(ca, uris, dns, error, message):
    with pytest.raises(error, match=message):
        ca.sign_csr(make_csr(*uris, dns=dns), ALICE, 3600)


def test_a_weak_rsa_key_is_refused(ca):
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(CsrError, match="1024 bits"):
        ca.sign_csr(make_csr(str(ALICE), key=weak), ALICE, 3600)


def test_an_operator_supplied_intermediate_signs_and_the_chain_ends_at_its_root(tmp_path):
    operator_root, operator_intermediate, files = operator_ca_files(tmp_path)
    root, intermediate = operator_root.cert, operator_intermediate.cert
    cert_file, key_file, chain_file = files["cert"], files["key"], files["chain"]

    with pytest.raises(CaError, match="intermediate CA.*--ca-chain"):
        CertificateAuthority.open(
            tmp_path / "ca", "cluster.local", ca_cert=cert_file, ca_key=key_file
        )
    with pytest.raises(CaError, match="not the private key"):
        CertificateAuthority.open(
            tmp_path / "ca", "cluster.local", ca_cert=chain_file, ca_key=key_file
        )

    ca = CertificateAuthority.open(tmp_path / "ca", "cluster.local", ca_cert=cert_file, ca_key=key_file,
                                   ca_chain=chain_file)  # fmt: skip
    assert ca.operator_supplied and ca.roots() == [root]
    assert not (tmp_path / "ca" / "root-key.pem").exists()  # the operator's key is never copied
    issued = ca.sign_csr(make_csr(str(ALICE)), ALICE, 3600)
    chain = [x509.load_pem_x509_certificate(item.encode()) for item in issued.chain_pem]
    assert chain[1:] == [intermediate, root]  # leaf, intermediates..., root last
    verify_client(chain[0], [root], chain=[intermediate])
    with pytest.raises(CaError, match="operator-supplied"):
        ca.rotate()


def test_rotation_trusts_both_roots_until_it_is_finished(tmp_path, ca):
    old_root = ca.signer.root
    ca.rotate(overlap=3600)
    bundle = x509.load_pem_x509_certificates((tmp_path / "ca" / "root-bundle.pem").read_bytes())
    assert bundle == [ca.signer.root, old_root] and ca.signer.root != old_root
    assert ca.signer.root.subject != old_root.subject  # verifiers match issuers by name first
    leaf = leaf_of(ca.sign_csr(make_csr(str(ALICE)), ALICE, 3600))
    leaf.verify_directly_issued_by(ca.signer.root)
    with pytest.raises(CaError, match="already under way"):
        ca.rotate()
    reopened = CertificateAuthority.open(tmp_path / "ca", "cluster.local")  # survives a restart
    assert reopened.roots() == [ca.signer.root, old_root]
    assert 3500 < reopened.overlap_until - time.time() <= 3600
    assert stat.S_IMODE((tmp_path / "ca" / "previous-root-key.pem").stat().st_mode) == 0o600
    reopened.finish_rotation()
    assert x509.load_pem_x509_certificates((tmp_path / "ca" / "root-bundle.pem").read_bytes()) == [
        ca.signer.root
    ]
    assert not (tmp_path / "ca" / "previous-root-key.pem").exists()
    with pytest.raises(CaError, match="no root rotation"):
        reopened.finish_rotation()


def test_an_elapsed_overlap_is_reported(ca):
    ca.rotate(overlap=0.01)
    time.sleep(0.02)
    assert ca.overlap_over()


def test_each_root_has_a_crl_it_signed_listing_its_revoked_serials(ca):
    first = ca.sign_csr(make_csr(str(ALICE)), ALICE, 3600)
    ca.rotate(overlap=3600)
    second = ca.sign_csr(make_csr(str(ALICE)), ALICE, 3600)
    revoked_at = time.time()
    text = ca.crls_pem(
        {first.issuer: [(first.serial, revoked_at)], second.issuer: [(second.serial, revoked_at)]}
    )
    crls = [x509.load_pem_x509_crl(part.encode()) for part in _pem_blocks(text, "X509 CRL")]
    assert len(crls) == 2
    for crl, root, serial in zip(
        crls, [ca.signer.root, ca.previous.root], [second.serial, first.serial], strict=True
    ):
        assert crl.issuer == root.subject
        assert crl.is_signature_valid(root.public_key())
        assert [entry.serial_number for entry in crl] == [serial]
        assert crl.next_update_utc - datetime.datetime.now(datetime.UTC) < datetime.timedelta(
            hours=5
        )
        assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number > 0
    empty = x509.load_pem_x509_crl(
        ca.crls_pem({}).split("-----END X509 CRL-----")[0].encode() + b"-----END X509 CRL-----\n"
    )
    assert list(empty) == []


def _pem_blocks(text: str, label: str) -> list[str]:
    end = f"-----END {label}-----"
    return [block + end + "\n" for block in text.split(end) if block.strip()]


def test_the_server_certificate_names_the_xds_host(ca):
    chain, key_pem, not_after = ca.server_certificate(["localhost", "127.0.0.1", "cp.example"])
    leaf = x509.load_pem_x509_certificates(chain)[0]
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "cp.example"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert b"PRIVATE KEY" in key_pem and not_after > time.time() + 3600


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("https://cluster.local/ns/a/sa/b", "must start with spiffe://"),
        ("spiffe://cluster.local/ns/a/sa/b/extra", "not of the form"),
        ("spiffe://cluster.local/ns/a/serviceaccount/b", "not of the form"),
        ("spiffe://Cluster.Local/ns/a/sa/b", "trust domain"),
        ("spiffe://cluster.local/ns/A_B/sa/b", "namespace"),
        ("spiffe://cluster.local/ns/a/sa/b\x00c", "control, space or non-ASCII"),
    ],
)
def test_malformed_spiffe_ids_are_refused_naming_the_part(uri, message):
    with pytest.raises(SpiffeIdError, match=message):
        SpiffeId.parse(uri)


def test_spiffe_ids_round_trip():
    assert str(SpiffeId.parse(str(ALICE))) == "spiffe://cluster.local/ns/default/sa/alice"


def test_join_tokens_store_only_a_hash_and_expire_and_revoke():
    text, record = tokens.new_token("alice", "default", 60, now=1000.0)
    token_id, secret = tokens.parse_token(text)
    assert text.startswith("meshctl-join.") and secret not in str(record.as_record())
    assert tokens.check_token(record, token_id, secret, now=1001.0) == record
    with pytest.raises(tokens.JoinTokenError, match="wrong secret"):
        tokens.check_token(
            record, token_id, secret[:-1] + ("A" if secret[-1] != "A" else "B"), now=1001.0
        )
    with pytest.raises(tokens.JoinTokenError, match="expired"):
        tokens.check_token(record, token_id, secret, now=1061.0)
    revoked = tokens.JoinToken.from_record({**record.as_record(), "revoked": True})
    with pytest.raises(tokens.JoinTokenError, match="revoked"):
        tokens.check_token(revoked, token_id, secret, now=1001.0)
    with pytest.raises(tokens.JoinTokenError, match="malformed"):
        tokens.parse_token("meshctl-join.nothex.x")


def test_requested_lifetimes_are_defaulted_and_bounded():
    from meshctl.control.identity_authority import CertificateSettings, IdentityError

    settings = CertificateSettings(default_ttl=3600, max_ttl=7200)
    assert settings.ttl_for(0) == 3600  # 0: the default
    assert settings.ttl_for(30) == 60  # never under a minute
    assert settings.ttl_for(600) == 600
    assert settings.ttl_for(10**9) == 7200  # capped
    with pytest.raises(IdentityError, match="negative"):
        settings.ttl_for(-1)
