"""JoinTokens/Describe on a real `meshctl serve`'s TLS xDS port, with meshctl's own gRPC client:
a join token is told the identity it grants (never its secret), and is refused exactly as
CreateCertificate refuses it (same status, same message) when unknown, expired or revoked.

The API token is refused there (PERMISSION_DENIED): it grants any identity an operator's CSR
names, so "which identity does this token grant" has no answer; a client certificate is refused
too (its holder already knows its identity)."""

from __future__ import annotations

import datetime
import re
import ssl
import time
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf import json_format, struct_pb2
from helpers.control_plane import ControlPlane, start_control_plane

from meshctl.control.istio_ca_messages import (
    CREATE_CERTIFICATE_METHOD,
    IstioCertificateRequest,
    IstioCertificateResponse,
)
from meshctl.grpc import GrpcError, StatusCode, open_grpc_channel
from meshctl.identity.join_token_grant import DESCRIBE_JOIN_TOKEN_METHOD

pytestmark = pytest.mark.meshctl_only

READS = "spiffe://cluster.local/ns/shop/sa/reads"
EMPTY = struct_pb2.Struct().SerializeToString()


@pytest.fixture(scope="module")
def plane(tmp_path_factory):
    started = start_control_plane(tmp_path_factory.mktemp("describe-plane"))
    yield started
    started.stop()


def tls_context(plane: ControlPlane, cert_dir: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(
        cafile=str(plane.data_dir / "meshctl" / "ca" / "root-bundle.pem")
    )
    if cert_dir is not None:
        context.load_cert_chain(cert_dir / "cert.pem", cert_dir / "key.pem")
    return context


def call(plane: ControlPlane, method: str, request: bytes, bearer: str | None = None,
         cert_dir: Path | None = None) -> bytes:  # fmt: skip
    host, port = plane.xds_address.rsplit(":", 1)
    metadata = [("authorization", f"Bearer {bearer}")] if bearer else []

    async def once() -> bytes:
        context = tls_context(plane, cert_dir)
        async with open_grpc_channel(
            host, int(port), ssl_context=context, connect_timeout=5
        ) as channel:
            return await channel.unary(method, request, metadata)

    return trio.run(once)


def describe(plane: ControlPlane, bearer: str | None, **options) -> dict:
    answer = call(plane, DESCRIBE_JOIN_TOKEN_METHOD, EMPTY, bearer, **options)
    return json_format.MessageToDict(struct_pb2.Struct.FromString(answer))


def refusal(
    plane: ControlPlane, method: str, request: bytes, bearer: str | None, **options
) -> GrpcError:
    with pytest.raises(GrpcError) as caught:
        call(plane, method, request, bearer, **options)
    return caught.value


def csr_for(uri: str, directory: Path | None = None) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "key.pem").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))  # fmt: skip
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    return request.public_bytes(serialization.Encoding.PEM).decode()


def create_certificate_request(uri: str, directory: Path | None = None) -> bytes:
    return IstioCertificateRequest(csr=csr_for(uri, directory)).SerializeToString()


def test_a_join_token_is_told_the_identity_it_grants_and_nothing_secret(plane):
    before = time.time()
    token = plane.join_token("reads", "shop", ttl_seconds=600)
    answer = describe(plane, token)
    assert set(answer) == {"spiffeId", "namespace", "serviceAccount", "expiresAt"}
    assert (answer["spiffeId"], answer["namespace"], answer["serviceAccount"]) == (
        READS,
        "shop",
        "reads",
    )
    expires = datetime.datetime.fromisoformat(answer["expiresAt"])
    assert answer["expiresAt"].endswith("Z")
    assert before + 600 - 2 <= expires.timestamp() <= time.time() + 600
    token_id, secret = token.split(".")[1:]
    assert secret not in repr(answer) and token_id not in repr(answer)
    # The token still works afterwards: Describe is a lookup, not a use.
    chain = call(plane, CREATE_CERTIFICATE_METHOD, create_certificate_request(READS), token)
    leaf = x509.load_pem_x509_certificate(
        IstioCertificateResponse.FromString(chain).cert_chain[0].encode()
    )
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.UniformResourceIdentifier) == [READS]
    assert secret not in plane.log()
    assert re.search(
        rf"told join token {token_id} \({re.escape(READS)}\) \(.*\) the identity", plane.log()
    )


def test_unknown_expired_and_revoked_tokens_are_refused_as_create_certificate_refuses_them(plane):
    expired = plane.join_token("reads", "shop", ttl_seconds=1)
    revoked = plane.join_token("reads", "shop")
    revoked_id = revoked.split(".")[1]
    plane.api("DELETE", f"/v1/identity/tokens/{revoked_id}")
    unknown = "meshctl-join.0123456789abcdef." + "A" * 43
    wrong_secret = revoked.rsplit(".", 1)[0] + "." + "B" * 43
    time.sleep(1.2)
    create = create_certificate_request(READS)
    for token, expected in [
        (expired, r"join token [0-9a-f]{16} expired \d+s ago; create a new one"),
        (revoked, rf"join token {revoked_id} is revoked"),
        (unknown, r"unknown join token 0123456789abcdef"),
        (wrong_secret, r"join token [0-9a-f]{16}: wrong secret"),
        (
            "meshctl-join.nonsense",
            r"malformed join token \(expected meshctl-join\.<id>\.<secret>\)",
        ),
    ]:
        described = refusal(plane, DESCRIBE_JOIN_TOKEN_METHOD, EMPTY, token)
        created = refusal(plane, CREATE_CERTIFICATE_METHOD, create, token)
        assert described.code == created.code == StatusCode.UNAUTHENTICATED, (described, created)
        assert re.fullmatch(expected, described.message), described.message
        assert described.message == created.message
        assert token.split(".")[-1] not in described.message


def test_the_api_token_a_certificate_and_no_credentials_are_refused(plane, tmp_path: Path):
    api_token = plane.token_path.read_text().strip()
    error = refusal(plane, DESCRIBE_JOIN_TOKEN_METHOD, EMPTY, api_token)
    assert error.code == StatusCode.PERMISSION_DENIED
    assert error.message == (
        "JoinTokens/Describe answers for a join token, not the API token: "
        "send 'authorization: Bearer <join token>'"
    )
    assert api_token not in error.message
    error = refusal(plane, DESCRIBE_JOIN_TOKEN_METHOD, EMPTY, "not-a-token")
    assert error.code == StatusCode.UNAUTHENTICATED
    assert error.message == "the bearer token is neither a join token nor the API token"
    error = refusal(plane, DESCRIBE_JOIN_TOKEN_METHOD, EMPTY, None)
    assert error.code == StatusCode.UNAUTHENTICATED and error.message.startswith("no credentials")
    # A workload with its certificate (and no token) already knows who it is.
    cert_dir = tmp_path / "reads"
    token = plane.join_token("reads", "shop")
    chain = call(
        plane, CREATE_CERTIFICATE_METHOD, create_certificate_request(READS, cert_dir), token
    )
    (cert_dir / "cert.pem").write_text(
        "".join(IstioCertificateResponse.FromString(chain).cert_chain)
    )
    error = refusal(plane, DESCRIBE_JOIN_TOKEN_METHOD, EMPTY, None, cert_dir=cert_dir)
    assert error.code == StatusCode.PERMISSION_DENIED
    assert re.fullmatch(
        rf"JoinTokens/Describe answers for a join token, not client certificate [0-9a-f]+ \({re.escape(READS)}\): "
        r"send 'authorization: Bearer <join token>'",
        error.message,
    )


def test_the_token_belongs_in_the_metadata_not_the_request(plane):
    token = plane.join_token("reads", "shop")
    request = struct_pb2.Struct()
    request.update({"token": token})
    error = refusal(plane, DESCRIBE_JOIN_TOKEN_METHOD, request.SerializeToString(), token)
    assert error.code == StatusCode.INVALID_ARGUMENT
    assert error.message.startswith("token: unknown field") and token not in error.message
    error = refusal(plane, DESCRIBE_JOIN_TOKEN_METHOD, b"\xff\xff", token)
    assert (
        error.code == StatusCode.INVALID_ARGUMENT
        and "not a google.protobuf.Struct" in error.message
    )
