"""The REST API with client certificates, against a real `meshctl serve`: `meshctl identity operator-cert`
issues an operator certificate, and meshctl's own calls over https:// use it instead of the API
token; no certificate, a workload's certificate and a revoked one are refused with the status
and message a user sees; plaintext HTTP with the token works as before; no key in the log."""

from __future__ import annotations

import datetime
import http.client
import json
import re
import ssl
import stat
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import PolicyBuilder, Store
from helpers.control_plane import ControlPlane, start_control_plane

from meshctl.control.istio_ca_messages import (
    CREATE_CERTIFICATE_METHOD,
    IstioCertificateRequest,
    IstioCertificateResponse,
)
from meshctl.grpc import open_grpc_channel

OPERATORS = "spiffe://cluster.local/ns/meshctl-system/sa"
REVIEWS = "spiffe://cluster.local/ns/default/sa/reviews"


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> ControlPlane:
    control_plane = start_control_plane(tmp_path_factory.mktemp("api-client-cert"))
    yield control_plane
    control_plane.stop()


def operator_cert(plane: ControlPlane, name: str, out: Path) -> str:
    """Issue an operator certificate with the CLI (API token, plain HTTP); its serial."""
    result = plane.meshctl("identity", "operator-cert", "--name", name, "--out", str(out))
    assert result.returncode == 0, result.stderr
    found = re.search(
        rf"operator certificate ([0-9a-f]+) for {OPERATORS}/{name}, valid until", result.stdout
    )
    assert found, result.stdout
    return found.group(1)


def https_env(
    plane: ControlPlane, tmp_path: Path, cert: Path | None, key: Path | None, root: Path
) -> dict:
    """meshctl's environment for https:// with a certificate, and no API token anywhere: the
    data dir is an empty one (no token file) and MESHCTL_TOKEN is unset."""
    env = {
        k: v
        for k, v in plane.env.items()
        if k not in ("MESHCTL_TOKEN", "MESHCTL_CLIENT_CERT", "MESHCTL_CLIENT_KEY")
    }
    empty = tmp_path / "no-token-here"
    empty.mkdir(exist_ok=True)
    env.update(
        XDG_DATA_HOME=str(empty),
        MESHCTL_CONTROL_PLANE=f"https://{plane.address}",
        MESHCTL_CA_ROOT=str(root),
    )
    if cert is not None:
        env["MESHCTL_CLIENT_CERT"] = str(cert)
    if key is not None:
        env["MESHCTL_CLIENT_KEY"] = str(key)
    return env


def raw_https(plane: ControlPlane, root: Path, cert: Path | None = None, key: Path | None = None,
              path: str = "/v1/resources", token: str | None = None) -> tuple[int, dict]:  # fmt: skip
    """One request over TLS, bypassing the CLI: (status, JSON body)."""
    context = ssl.create_default_context(cafile=str(root))
    if cert is not None:
        context.load_cert_chain(cert, key)
    host, port = plane.address.split(":")
    connection = http.client.HTTPSConnection(host, int(port), timeout=10, context=context)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def virtual_service(namespace: str) -> str:
    return f"""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: ratings, namespace: {namespace}}}
spec:
  hosts: [ratings]
  http:
  - route:
    - destination: {{host: ratings}}
"""


def workload_certificate(plane: ControlPlane, directory: Path) -> tuple[Path, Path]:
    """A workload's certificate (default/reviews) as a sidecar gets it: join token, key made
    here, CSR over the TLS xDS port."""
    token = plane.join_token("reviews")
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(REVIEWS)]), critical=True
        )
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
        .decode()
    )
    host, port = plane.xds_address.split(":")
    bundle = plane.data_dir / "meshctl" / "ca" / "root-bundle.pem"

    async def create() -> list[str]:
        context = ssl.create_default_context(cafile=str(bundle))
        async with open_grpc_channel(
            host, int(port), ssl_context=context, connect_timeout=5
        ) as channel:
            answer = await channel.unary(
                CREATE_CERTIFICATE_METHOD,
                IstioCertificateRequest(csr=csr).SerializeToString(),
                [("authorization", f"Bearer {token}")],
            )
        return list(IstioCertificateResponse.FromString(answer).cert_chain)

    chain = trio.run(create)
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "reviews-cert.pem", directory / "reviews-key.pem"
    cert_path.write_text("".join(chain[:-1]))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    key_path.chmod(0o600)
    return cert_path, key_path


def test_operator_cert_writes_a_verified_operator_identity_and_a_private_key(plane, tmp_path):
    out = tmp_path / "ops"
    serial = operator_cert(plane, "alice", out)
    assert stat.S_IMODE((out / "key.pem").stat().st_mode) == 0o600
    leaf = x509.load_pem_x509_certificate((out / "cert.pem").read_bytes())
    assert format(leaf.serial_number, "x") == serial
    roots = x509.load_pem_x509_certificates((out / "root.pem").read_bytes())
    verified = PolicyBuilder().store(Store(roots)).build_client_verifier().verify(leaf, [])
    assert [name.value for name in verified.subjects] == [f"{OPERATORS}/alice"]
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert datetime.timedelta(hours=23) < lifetime <= datetime.timedelta(hours=24, minutes=5)
    key = serialization.load_pem_private_key((out / "key.pem").read_bytes(), None)
    assert key.public_key() == leaf.public_key()
    listed = plane.meshctl("identity", "list")
    assert f"{OPERATORS}/alice" in listed.stdout and serial in listed.stdout

    short = plane.meshctl(
        "identity", "operator-cert", "--name", "bob", "--out", str(tmp_path / "b"), "--ttl", "10m"
    )
    assert short.returncode == 0, short.stderr
    leaf = x509.load_pem_x509_certificate((tmp_path / "b" / "cert.pem").read_bytes())
    remaining = leaf.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    assert datetime.timedelta(minutes=9) < remaining <= datetime.timedelta(minutes=10)  # --ttl 10m

    bad = plane.meshctl(
        "identity", "operator-cert", "--name", "Not_A_Name", "--out", str(tmp_path / "c")
    )
    assert bad.returncode == 2 and "Not_A_Name" in bad.stderr
    assert not (tmp_path / "c").exists()


def test_apply_and_get_over_https_with_the_certificate_and_no_token(plane, tmp_path):
    out = tmp_path / "ops"
    serial = operator_cert(plane, "carol", out)
    env = https_env(plane, tmp_path, out / "cert.pem", out / "key.pem", out / "root.pem")

    applied = plane.meshctl("apply", "-f", "-", stdin=virtual_service("tls-ns"), env=env)
    assert applied.returncode == 0, applied.stderr
    assert "VirtualService tls-ns/ratings created" in applied.stdout
    got = plane.meshctl("get", "vs", "ratings", "-n", "tls-ns", "-o", "json", env=env)
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["spec"]["hosts"] == ["ratings"]
    # The same, with options instead of the environment.
    options = ["--control-plane", f"https://{plane.address}", "--client-cert", str(out / "cert.pem"),
               "--client-key", str(out / "key.pem"), "--ca-root", str(out / "root.pem")]  # fmt: skip
    env_without = {
        k: v
        for k, v in env.items()
        if not k.startswith(("MESHCTL_CLIENT", "MESHCTL_CA_ROOT", "MESHCTL_CONTROL"))
    }
    listed = plane.meshctl("get", "vs", "-n", "tls-ns", *options, env=env_without)
    assert listed.returncode == 0 and "ratings" in listed.stdout, listed.stderr
    # The server saw the certificate, and no token reached it (there was none to send).
    assert re.search(
        rf"POST /v1/apply: 200 \(operator client certificate {serial} \({OPERATORS}/carol\)\)",
        plane.log(),
    )


def test_https_without_a_certificate_or_token_is_401(plane, tmp_path):
    root = plane.data_dir / "meshctl" / "ca" / "root-bundle.pem"
    status, body = raw_https(plane, root)
    assert status == 401
    assert "no API token and no client certificate" in body["error"]["message"]
    assert f"{OPERATORS}/NAME" in body["error"]["message"]
    # The token over TLS (a server-authenticated channel) is accepted as over plain HTTP.
    status, _ = raw_https(plane, root, token=plane.token_path.read_text().strip())
    assert status == 200
    env = https_env(plane, tmp_path, None, None, root)
    wrong = plane.meshctl("get", "vs", "--token", "not-the-token", env=env)
    assert wrong.returncode == 1 and "no API token and no client certificate" in wrong.stderr


def test_a_workload_certificate_is_403_naming_its_spiffe_id(plane, tmp_path):
    cert, key = workload_certificate(plane, tmp_path / "reviews")
    root = plane.data_dir / "meshctl" / "ca" / "root-bundle.pem"
    status, body = raw_https(plane, root, cert, key)
    assert status == 403
    assert (
        REVIEWS in body["error"]["message"]
        and "not an operator identity" in body["error"]["message"]
    )
    refused = plane.meshctl("apply", "-f", "-", stdin=virtual_service("workload-ns"),
                            env=https_env(plane, tmp_path, cert, key, root))  # fmt: skip
    assert refused.returncode == 1
    assert REVIEWS in refused.stderr and "not an operator identity" in refused.stderr
    assert plane.api("GET", "/v1/resources/virtualservices?namespace=workload-ns")["items"] == []


def test_a_revoked_operator_certificate_is_401_naming_its_serial(plane, tmp_path):
    out = tmp_path / "ops"
    serial = operator_cert(plane, "dave", out)
    env = https_env(plane, tmp_path, out / "cert.pem", out / "key.pem", out / "root.pem")
    assert plane.meshctl("get", "vs", env=env).returncode == 0
    revoked = plane.meshctl("identity", "revoke", serial)
    assert revoked.returncode == 0, revoked.stderr
    refused = plane.meshctl("get", "vs", env=env)
    assert refused.returncode == 1
    assert f"client certificate {serial} ({OPERATORS}/dave) is revoked" in refused.stderr
    status, body = raw_https(plane, out / "root.pem", out / "cert.pem", out / "key.pem")
    assert status == 401 and serial in body["error"]["message"]


def test_a_certificate_from_another_ca_fails_the_handshake(plane, tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "impostor")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"{OPERATORS}/eve")]), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_path, key_path = tmp_path / "eve-cert.pem", tmp_path / "eve-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    key_path.chmod(0o600)
    root = plane.data_dir / "meshctl" / "ca" / "root-bundle.pem"
    refused = plane.meshctl("get", "vs", env=https_env(plane, tmp_path, cert_path, key_path, root))
    assert refused.returncode == 1 and "client certificate it cannot verify" in refused.stderr, (
        refused.stderr
    )
    assert "TLS handshake with" in plane.log()


def test_plaintext_with_the_token_still_works(plane, tmp_path):
    applied = plane.meshctl("apply", "-f", "-", stdin=virtual_service("plain-ns"))
    assert applied.returncode == 0, applied.stderr
    assert plane.api("GET", "/v1/resources/virtualservices?namespace=plain-ns")["items"]
    host, port = plane.address.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.request("GET", "/v1/resources")
    response = connection.getresponse()
    assert response.status == 401
    assert json.loads(response.read())["error"]["message"] == (
        "missing or wrong API token (Authorization: Bearer <token>)"
    )
    connection.close()


def test_bad_certificate_options_exit_2_naming_the_file(plane, tmp_path):
    out = tmp_path / "ops"
    operator_cert(plane, "frank", out)
    cert, key, root = out / "cert.pem", out / "key.pem", out / "root.pem"
    missing = tmp_path / "nope.pem"
    cases = [
        (https_env(plane, tmp_path, missing, key, root), [f"client certificate {missing} does not exist (--client-cert / $MESHCTL_CLIENT_CERT)"]),
        (https_env(plane, tmp_path, cert, missing, root), [f"private key {missing} does not exist"]),
        (https_env(plane, tmp_path, cert, key, missing), [f"CA root bundle {missing} does not exist (--ca-root / $MESHCTL_CA_ROOT"]),
        (https_env(plane, tmp_path, cert, None, root), ["--client-cert needs --client-key"]),
        (https_env(plane, tmp_path, root, key, root), [f"client key {key} does not belong to client certificate {root}"]),
        ({**https_env(plane, tmp_path, cert, key, root), "MESHCTL_CONTROL_PLANE": plane.address},
         ["presented over TLS only", f"https://{plane.address}"]),
    ]  # fmt: skip
    for env, expected in cases:
        result = plane.meshctl("get", "vs", env=env)
        assert result.returncode == 2, (expected, result.stderr)
        for text in expected:
            assert text in result.stderr
    readable = tmp_path / "readable-key.pem"
    readable.write_bytes(key.read_bytes())
    readable.chmod(0o644)
    result = plane.meshctl("get", "vs", env=https_env(plane, tmp_path, cert, readable, root))
    assert (
        result.returncode == 2
        and f"private key {readable} is accessible by others" in result.stderr
    )
    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    result = plane.meshctl("get", "vs", env=https_env(plane, tmp_path, unreadable, key, root))
    assert result.returncode == 2 and str(unreadable) in result.stderr


def test_no_key_in_the_serve_log(plane, tmp_path):
    out = tmp_path / "ops"
    operator_cert(plane, "grace", out)
    env = https_env(plane, tmp_path, out / "cert.pem", out / "key.pem", out / "root.pem")
    assert plane.meshctl("get", "vs", env=env).returncode == 0
    log = plane.log()
    assert "PRIVATE KEY" not in log
    for key_file in tmp_path.parent.glob("*/ops/key.pem"):
        body = [line for line in key_file.read_text().splitlines() if not line.startswith("-----")]
        assert not any(line in log for line in body), key_file
