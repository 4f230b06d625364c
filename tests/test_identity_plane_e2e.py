"""The CA of a real `meshctl serve`, end to end: join tokens from the CLI, CSRs made here sent over TLS
to the xDS port with meshctl's own gRPC client, renewal with the client certificate, revocation
reaching the ROOTCA secret over ADS, root rotation, and no key material in the log."""

from __future__ import annotations

import os
import re
import ssl
import time
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store
from envoy.config.core.v3.base_pb2 import Node
from envoy.extensions.transport_sockets.tls.v3.secret_pb2 import Secret
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest, DiscoveryResponse
from google.protobuf import struct_pb2
from helpers.control_plane import ControlPlane, start_control_plane
from helpers.pki import operator_ca_files

from meshctl.control.client import Client
from meshctl.control.istio_ca_messages import (
    CREATE_CERTIFICATE_METHOD,
    IstioCertificateRequest,
    IstioCertificateResponse,
)
from meshctl.grpc import GrpcError, StatusCode, open_grpc_channel

ADS_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
REGISTER_METHOD = "/meshctl.registry.v1.Registry/Register"
SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
ALICE = "spiffe://cluster.local/ns/default/sa/alice"
BOB = "spiffe://cluster.local/ns/default/sa/bob"


@pytest.fixture(scope="module")
def plane(tmp_path_factory):
    plane = start_control_plane(tmp_path_factory.mktemp("identity-plane"))
    yield plane
    plane.stop()


def xds_address(plane: ControlPlane) -> tuple[str, int]:
    found = re.search(r"xDS \(ADS, ([^)]*)\) on ([\d.]+):(\d+)", plane.log())
    assert found, plane.log()
    return found.group(2), int(found.group(3))


def bundle_path(plane: ControlPlane) -> Path:
    return plane.data_dir / "meshctl" / "ca" / "root-bundle.pem"


class Workload:
    """A workload's key (made here, never sent) and the files its certificate goes into."""

    def __init__(self, directory: Path, name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.key_pem = self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self.cert_path = directory / f"{name}-cert.pem"
        self.key_path = directory / f"{name}-key.pem"
        self.key_path.write_bytes(self.key_pem)
        self.key_path.chmod(0o600)

    def csr(self, uri: str) -> str:
        request = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([]))
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True
            )
            .sign(self.key, hashes.SHA256())
        )
        return request.public_bytes(serialization.Encoding.PEM).decode()

    def keep(self, chain: list[str]) -> x509.Certificate:
        self.cert_path.write_text("".join(chain))
        return x509.load_pem_x509_certificate(chain[0].encode())


def tls_context(
    plane: ControlPlane, workload: Workload | None = None, cafile: Path | None = None
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(cafile or bundle_path(plane)))
    if workload is not None:
        context.load_cert_chain(workload.cert_path, workload.key_path)
    return context


async def _create(
    plane, csr: str, *, bearer=None, workload=None, ttl=0, plaintext=False, cafile=None
) -> list[str]:
    host, port = xds_address(plane)
    metadata = [("authorization", f"Bearer {bearer}")] if bearer else []
    request = IstioCertificateRequest(csr=csr, validity_duration=ttl)
    request.metadata.update({"nodeId": "test-node"})
    context = None if plaintext else tls_context(plane, workload, cafile)
    async with open_grpc_channel(host, port, ssl_context=context, connect_timeout=5) as channel:
        answer = await channel.unary(
            CREATE_CERTIFICATE_METHOD, request.SerializeToString(), metadata
        )
    return list(IstioCertificateResponse.FromString(answer).cert_chain)


def create_certificate(plane, csr: str, **options) -> list[str]:
    return trio.run(lambda: _create(plane, csr, **options))


def refused(plane, csr: str, **options) -> GrpcError:
    with pytest.raises(GrpcError) as caught:
        create_certificate(plane, csr, **options)
    return caught.value


def join_token(plane: ControlPlane, service_account: str, ttl: str = "10m") -> str:
    result = plane.meshctl(
        "identity", "token", "create", "--service-account", service_account, "--ttl", ttl
    )
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert re.fullmatch(r"meshctl-join\.[0-9a-f]{16}\.[A-Za-z0-9_-]{43}", token), (
        result.stdout
    )  # only the token
    return token


def roots(plane: ControlPlane) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(bundle_path(plane).read_bytes())


def verify_as_client(leaf: x509.Certificate, plane: ControlPlane) -> None:
    verified = PolicyBuilder().store(Store(roots(plane))).build_client_verifier().verify(leaf, [])
    assert [name.value for name in verified.subjects] == [ALICE]


def test_a_join_token_gets_a_certificate_that_verifies_against_the_bundle(plane, tmp_path):
    alice = Workload(tmp_path, "alice")
    chain = create_certificate(plane, alice.csr(ALICE), bearer=join_token(plane, "alice"), ttl=600)
    leaf = alice.keep(chain)
    assert len(chain) == 2 and x509.load_pem_x509_certificate(chain[-1].encode()) == roots(plane)[0]
    verify_as_client(leaf, plane)
    assert 590 < (leaf.not_valid_after_utc.timestamp() - time.time()) <= 600
    listed = plane.meshctl("identity", "list")
    assert listed.returncode == 0, listed.stderr
    assert re.search(
        rf"{re.escape(ALICE)}\s+{leaf.serial_number:x}\s+\S+Z\s+no\s+test-node", listed.stdout
    )


def test_a_token_obtains_only_its_own_service_account(plane, tmp_path):
    token = join_token(plane, "alice")
    error = refused(plane, Workload(tmp_path, "x").csr(BOB), bearer=token)
    assert error.code == StatusCode.PERMISSION_DENIED
    assert (
        "CSR SAN mismatch" in error.message
        and "sa/bob" in error.message
        and "sa/alice" in error.message
    )


def test_expired_and_revoked_tokens_are_refused(plane, tmp_path):
    csr = Workload(tmp_path, "alice").csr(ALICE)
    expired = join_token(plane, "alice", ttl="1s")
    revoked = join_token(plane, "alice")
    token_id = revoked.split(".")[1]
    result = plane.meshctl("identity", "token", "revoke", token_id)
    assert result.returncode == 0, result.stderr
    time.sleep(1.2)
    error = refused(plane, csr, bearer=expired)
    assert error.code == StatusCode.UNAUTHENTICATED and "expired" in error.message
    error = refused(plane, csr, bearer=revoked)
    assert (
        error.code == StatusCode.UNAUTHENTICATED
        and f"join token {token_id} is revoked" in error.message
    )
    listed = plane.meshctl("identity", "token", "list").stdout
    assert re.search(rf"{token_id}\s+default\s+alice\s+\S+\s+revoked", listed)
    assert revoked.split(".")[2] not in listed  # never the secret
    error = refused(plane, csr, bearer="meshctl-join.0123456789abcdef." + "A" * 43)
    assert error.code == StatusCode.UNAUTHENTICATED and "unknown join token" in error.message
    error = refused(plane, csr)
    assert error.code == StatusCode.UNAUTHENTICATED and "no credentials" in error.message


def test_renewal_with_the_client_certificate_and_refusal_once_revoked(plane, tmp_path):
    alice = Workload(tmp_path, "alice")
    first = alice.keep(
        create_certificate(plane, alice.csr(ALICE), bearer=join_token(plane, "alice"))
    )
    # Renewal: no token, the certificate itself; a new key, the same identity.
    renewed_key = Workload(tmp_path, "alice-next")
    second = renewed_key.keep(create_certificate(plane, renewed_key.csr(ALICE), workload=alice))
    assert second.serial_number != first.serial_number
    verify_as_client(second, plane)
    error = refused(plane, alice.csr(BOB), workload=alice)
    assert error.code == StatusCode.PERMISSION_DENIED and "CSR SAN mismatch" in error.message

    result = plane.meshctl("identity", "revoke", format(first.serial_number, "x"))
    assert result.returncode == 0, result.stderr
    assert f"certificate {first.serial_number:x} ({ALICE}) revoked" in result.stdout
    error = refused(plane, alice.csr(ALICE), workload=alice)
    assert error.code == StatusCode.PERMISSION_DENIED
    assert f"client certificate {first.serial_number:x} ({ALICE}) is revoked" in error.message
    # The other certificate of the same identity is unaffected.
    create_certificate(plane, renewed_key.csr(ALICE), workload=renewed_key)


def test_the_xds_port_refuses_a_plaintext_client(plane, tmp_path):
    with pytest.raises(GrpcError) as caught:
        create_certificate(
            plane,
            Workload(tmp_path, "p").csr(ALICE),
            bearer=join_token(plane, "alice"),
            plaintext=True,
        )
    assert caught.value.code == StatusCode.UNAVAILABLE


def test_cli_input_errors_and_missing_certificates_have_their_exit_codes(plane):
    assert plane.meshctl("identity", "revoke", "abc123").returncode == 4
    assert (
        plane.meshctl("identity", "revoke", "abc123", "--service-account", "alice").returncode == 2
    )
    assert plane.meshctl("identity", "revoke").returncode == 2
    assert (
        plane.meshctl(
            "identity", "token", "create", "--service-account", "a", "--ttl", "soon"
        ).returncode
        == 2
    )
    result = plane.meshctl("identity", "token", "create", "--service-account", "Not_A_Name")
    assert result.returncode == 2 and "service account 'Not_A_Name'" in result.stderr
    assert plane.meshctl("identity", "token", "revoke", "0000000000000000").returncode == 4
    assert plane.meshctl("identity", "revoke", "--service-account", "nobody").returncode == 4


async def _register_and_follow_rootca(
    plane, workload: Workload, node_id: str, revoke, serial: int, identity: str = BOB
) -> tuple[int, list[int]]:
    """Register over gRPC with `workload`'s client certificate (of `identity`, not the one being
    revoked), subscribe to ROOTCA over ADS, revoke, and return (seconds until the new CRL
    arrived, serials in it)."""
    host, port = xds_address(plane)
    async with open_grpc_channel(host, port, ssl_context=tls_context(plane, workload)) as channel:
        body = struct_pb2.Struct()
        body.update(
            {
                "nodeId": node_id,
                "service": "observer",
                "namespace": "default",
                "appPort": 18080,
                "ready": True,
            }
        )
        answer = struct_pb2.Struct.FromString(
            await channel.unary(REGISTER_METHOD, body.SerializeToString())
        )
        assert answer["sidecar"]["identity"] == identity
        async with channel.open_stream(ADS_METHOD) as stream:
            node = Node(id=node_id, cluster="observer")
            await stream.send_message(
                DiscoveryRequest(
                    node=node, type_url=SECRET_TYPE, resource_names=["ROOTCA"]
                ).SerializeToString()
            )
            with trio.fail_after(10):
                response = DiscoveryResponse.FromString(await stream.receive_message())
            assert serial not in _revoked_serials(response)
            await stream.send_message(DiscoveryRequest(
                node=node, type_url=SECRET_TYPE, resource_names=["ROOTCA"],
                version_info=response.version_info, response_nonce=response.nonce,
            ).SerializeToString())  # fmt: skip
            started = time.monotonic()
            await trio.to_thread.run_sync(revoke)
            with trio.fail_after(5):
                while True:
                    response = DiscoveryResponse.FromString(await stream.receive_message())
                    if serial in _revoked_serials(response):
                        return time.monotonic() - started, _revoked_serials(response)


async def _open_ads(
    plane, workload: Workload | None, bearer: str | None = None, timeout: float = 10
) -> None:
    """Ask for ROOTCA over ADS (with `workload`'s client certificate, or `bearer` metadata) and
    wait for the answer: GrpcError if refused, trio.TooSlowError if none within `timeout`."""
    host, port = xds_address(plane)
    context = tls_context(plane, workload)
    metadata = [("authorization", f"Bearer {bearer}")] if bearer else []
    async with (
        open_grpc_channel(host, port, ssl_context=context) as channel,
        channel.open_stream(ADS_METHOD, metadata) as stream,
    ):
        request = DiscoveryRequest(
            node=Node(id="alice-2"), type_url=SECRET_TYPE, resource_names=["ROOTCA"]
        )
        await stream.send_message(request.SerializeToString())
        with trio.fail_after(timeout):
            await stream.receive_message()


def _revoked_serials(response: DiscoveryResponse) -> list[int]:
    [packed] = response.resources
    secret = Secret.FromString(packed.value)
    assert secret.name == "ROOTCA"
    context = secret.validation_context
    assert x509.load_pem_x509_certificates(context.trusted_ca.inline_string.encode())
    text = context.crl.inline_string
    crls = [x509.load_pem_x509_crl((part + "-----END X509 CRL-----\n").encode())
            for part in text.split("-----END X509 CRL-----") if part.strip()]  # fmt: skip
    return [entry.serial_number for crl in crls for entry in crl]


def test_ads_needs_a_client_certificate_or_the_api_token(plane, tmp_path):
    for bearer in (None, "not-the-api-token", join_token(plane, "alice")):
        with pytest.raises(GrpcError) as caught:
            trio.run(_open_ads, plane, None, bearer)
        assert caught.value.code == StatusCode.UNAUTHENTICATED, bearer
        assert "client certificate" in caught.value.message
    # Accepted: the stream stays open, waiting for a snapshot of a node nobody registered.
    with pytest.raises(trio.TooSlowError):  # an operator's tool (or an Envoy given the token)
        trio.run(_open_ads, plane, None, plane.token_path.read_text().strip(), 2)
    alice = Workload(tmp_path, "alice-ads")
    alice.keep(create_certificate(plane, alice.csr(ALICE), bearer=join_token(plane, "alice")))
    with pytest.raises(trio.TooSlowError):  # a sidecar
        trio.run(_open_ads, plane, alice, None, 2)


def test_a_revocation_reaches_the_rootca_secret_over_ads_within_seconds(plane, tmp_path):
    bob = Workload(tmp_path, "bob-reg")
    alice = Workload(tmp_path, "alice-reg")
    leaf = alice.keep(
        create_certificate(plane, alice.csr(ALICE), bearer=join_token(plane, "alice"))
    )
    bob.keep(create_certificate(plane, bob.csr(BOB), bearer=join_token(plane, "bob")))

    def revoke() -> None:
        result = plane.meshctl("identity", "revoke", "--service-account", "alice")
        assert result.returncode == 0, result.stderr

    took, serials = trio.run(
        _register_and_follow_rootca, plane, bob, "bob-1", revoke, leaf.serial_number
    )
    assert took < 5 and leaf.serial_number in serials
    # A revoked certificate no longer opens an ADS stream either.
    with pytest.raises(GrpcError) as caught:
        trio.run(_open_ads, plane, alice)
    assert (
        caught.value.code == StatusCode.PERMISSION_DENIED and "is revoked" in caught.value.message
    )
    registered = Client(tuple(plane.address.split(":")), plane.token_path.read_text().strip())
    registered.port = int(registered.port)
    [sidecar] = [s for s in registered.sidecars()["items"] if s["nodeId"] == "bob-1"]
    assert sidecar["identity"] == BOB
    # Every alice certificate is now revoked; bob's are not.
    listed = plane.meshctl("identity", "list").stdout
    assert not re.search(rf"{re.escape(ALICE)}\s+\S+\s+\S+\s+no", listed)
    assert re.search(rf"{re.escape(BOB)}\s+\S+\s+\S+\s+no", listed)


def test_registration_in_another_namespace_than_the_certificate_is_refused(plane, tmp_path):
    alice = Workload(tmp_path, "alice-ns")
    alice.keep(create_certificate(plane, alice.csr(ALICE), bearer=join_token(plane, "alice")))

    async def register() -> None:
        host, port = xds_address(plane)
        async with open_grpc_channel(host, port, ssl_context=tls_context(plane, alice)) as channel:
            body = struct_pb2.Struct()
            body.update({"nodeId": "sneaky", "service": "billing", "namespace": "payments"})
            await channel.unary(REGISTER_METHOD, body.SerializeToString())

    with pytest.raises(GrpcError) as caught:
        trio.run(register)
    assert caught.value.code == StatusCode.PERMISSION_DENIED
    assert "namespace payments is not the namespace of client certificate" in caught.value.message


def test_root_rotation_trusts_both_roots_until_finished(tmp_path):
    plane = start_control_plane(tmp_path / "rotation", "--cert-ttl", "10m")
    try:
        alice = Workload(tmp_path, "alice")
        old_root = roots(plane)[0]
        old_leaf = alice.keep(
            create_certificate(plane, alice.csr(ALICE), bearer=join_token(plane, "alice"))
        )
        shown = plane.meshctl("identity", "root", "show")
        assert (
            shown.returncode == 0
            and "SHA-256 fingerprint:" in shown.stdout
            and shown.stdout.count("BEGIN CERTIFICATE") == 1
        )
        rotated = plane.meshctl("identity", "root", "rotate", "--overlap", "1h")
        assert rotated.returncode == 0, rotated.stderr
        assert (
            "root rotation started" in rotated.stdout
            and rotated.stdout.count("BEGIN CERTIFICATE") == 2
        )
        new_root, previous = roots(plane)
        assert previous == old_root and new_root != old_root
        # Sidecars started before the rotation know only the old root: during the overlap the
        # xDS port's own certificate still chains to it.
        old_only = tmp_path / "old-root.pem"
        old_only.write_bytes(old_root.public_bytes(serialization.Encoding.PEM))
        create_certificate(plane, alice.csr(ALICE), workload=alice, cafile=old_only)
        assert plane.meshctl("identity", "root", "rotate").returncode == 3  # one rotation at a time
        # The old certificate still authenticates (both roots trusted), and its renewal is signed
        # by the new root.
        renewed = alice.keep(create_certificate(plane, alice.csr(ALICE), workload=alice))
        renewed.verify_directly_issued_by(new_root)
        old_leaf.verify_directly_issued_by(old_root)
        assert 590 < renewed.not_valid_after_utc.timestamp() - time.time() <= 600  # --cert-ttl
        finished = plane.meshctl("identity", "root", "rotate", "--finish")
        assert finished.returncode == 0, finished.stderr
        assert roots(plane) == [new_root]
        assert plane.meshctl("identity", "root", "rotate", "--finish").returncode == 3
        # A new connection is verified against the new root only: the new certificate works.
        create_certificate(plane, alice.csr(ALICE), workload=alice)
    finally:
        plane.stop()
    _assert_no_key_material(plane, [alice.key_pem])


def test_plaintext_mode_says_so(tmp_path):
    plane = start_control_plane(tmp_path / "plain", "--xds-plaintext")
    try:
        assert "xDS (ADS, plaintext h2c: debugging only" in plane.log()
        chain = create_certificate(
            plane,
            Workload(tmp_path, "a").csr(ALICE),
            bearer=join_token(plane, "alice"),
            plaintext=True,
        )
        assert len(chain) == 2
    finally:
        plane.stop()


def test_no_key_material_in_the_log(plane):
    root_key = (plane.data_dir / "meshctl" / "ca" / "root-key.pem").read_bytes()
    _assert_no_key_material(plane, [root_key])


def _assert_no_key_material(plane: ControlPlane, keys: list[bytes]) -> None:
    log = plane.log()
    assert "issued certificate" in log  # the log is the right one
    assert "PRIVATE KEY" not in log
    for key in keys:
        body = b"".join(line for line in key.splitlines() if not line.startswith(b"-----"))
        assert body.decode() not in log.replace("\n", "")
        for line in key.splitlines()[1:-1]:
            assert line.decode() not in log


def test_serve_signs_with_an_operator_supplied_intermediate(tmp_path):
    operator_root, operator_intermediate, written = operator_ca_files(tmp_path)
    root, intermediate = operator_root.cert, operator_intermediate.cert
    key_pem = written["key"].read_bytes()
    files = ["--ca-cert", str(written["cert"]), "--ca-key", str(written["key"]),
             "--ca-chain", str(written["chain"])]  # fmt: skip
    plane = start_control_plane(tmp_path / "operator", *files)
    try:
        assert "operator-supplied" in plane.log() and roots(plane) == [root]
        alice = Workload(tmp_path, "alice")
        chain = create_certificate(plane, alice.csr(ALICE), bearer=join_token(plane, "alice"))
        certificates = [x509.load_pem_x509_certificate(item.encode()) for item in chain]
        assert certificates[1:] == [intermediate, root]
        verifier = PolicyBuilder().store(Store([root])).build_client_verifier()
        verifier.verify(certificates[0], [intermediate])
        assert (
            plane.meshctl("identity", "root", "rotate").returncode == 3
        )  # the operator rotates it
    finally:
        plane.stop()
    _assert_no_key_material(plane, [key_pem])


def test_serve_refuses_bad_ca_options(tmp_path):
    import subprocess
    import sys

    def serve(*args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "XDG_DATA_HOME": str(tmp_path)}
        command = [
            sys.executable,
            "-m",
            "meshctl",
            "serve",
            "--api-port",
            "0",
            "--xds-port",
            "0",
            *args,
        ]
        return subprocess.run(
            command, capture_output=True, text=True, env=env, timeout=30, check=False
        )

    result = serve("--ca-cert", str(tmp_path / "missing.pem"))
    assert result.returncode == 1 and "--ca-cert and --ca-key go together" in result.stderr
    result = serve("--cert-ttl", "30s")
    assert result.returncode == 2 and "shorter than the minimum" in result.stderr
    result = serve("--cert-ttl", "48h")
    assert result.returncode == 2 and "longer than --max-cert-ttl" in result.stderr
    result = serve("--trust-domain", "Bad Domain")
    assert result.returncode == 2 and "trust domain" in result.stderr


def test_a_revocation_ends_the_ads_stream_of_that_certificate(plane, tmp_path):
    carol = "spiffe://cluster.local/ns/default/sa/carol"
    workload = Workload(tmp_path, "carol")
    leaf = workload.keep(
        create_certificate(plane, workload.csr(carol), bearer=join_token(plane, "carol"))
    )

    async def follow_then_revoke() -> GrpcError:
        host, port = xds_address(plane)
        context = tls_context(plane, workload)
        async with (
            open_grpc_channel(host, port, ssl_context=context) as channel,
            channel.open_stream(ADS_METHOD) as stream,
        ):
            request = DiscoveryRequest(node=Node(id="carol-1"), type_url=SECRET_TYPE)
            await stream.send_message(request.SerializeToString())
            revoke = ("identity", "revoke", format(leaf.serial_number, "x"))
            await trio.to_thread.run_sync(lambda: plane.meshctl(*revoke))
            with trio.fail_after(5), pytest.raises(GrpcError) as caught:
                await stream.receive_message()
            return caught.value

    error = trio.run(follow_then_revoke)
    assert error.code == StatusCode.PERMISSION_DENIED
    assert f"client certificate {leaf.serial_number:x} ({carol}) is revoked" in error.message
