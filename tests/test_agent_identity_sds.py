"""The workload certificate on its way out of the agent: the SDS Secret `default` (which the
engine takes, and never shows the key of), the secrets ADS asks the control plane for (those
the config names, never `default`), and the cert dir's files."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.listener.v3.listener_pb2 import Listener
from envoy.extensions.transport_sockets.tls.v3.secret_pb2 import Secret
from envoy.extensions.transport_sockets.tls.v3.tls_pb2 import (
    DownstreamTlsContext,
    UpstreamTlsContext,
)
from google.protobuf import json_format

from meshctl.agent import xds_references as refs
from meshctl.agent.cert_files import write_cert_dir
from meshctl.agent.mesh_agent import trust_bundle
from meshctl.agent.sds_secret import SECRET_TYPE, workload_secret
from meshctl.agent.workload_csr import (
    certificate_request,
    new_private_key,
    private_key_pem,
    read_issued_chain,
)
from meshctl.identity.ca import CertificateAuthority, load_csr
from meshctl.identity.spiffe import SpiffeId

SDS = {"ads": {}, "resource_api_version": "V3"}


def _common(extra_validation_name: str = "ROOTCA") -> dict:
    return {
        "alpn_protocols": ["h2"],
        "tls_certificate_sds_secret_configs": [{"name": "default", "sds_config": SDS}],
        "combined_validation_context": {
            "default_validation_context": {
                "match_typed_subject_alt_names": [
                    {"san_type": "URI", "matcher": {"exact": "spiffe://cluster.local/ns/default/sa/reviews"}}
                ]
            },
            "validation_context_sds_secret_config": {"name": extra_validation_name, "sds_config": SDS},
        },
    }


def _socket(context_type, context: dict) -> dict:
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {"@type": f"type.googleapis.com/{context_type.DESCRIPTOR.full_name}", **context},
    }


def test_ads_asks_for_the_secrets_the_config_names_but_never_default():
    cluster = json_format.ParseDict(
        {
            "name": "outbound|9080||reviews.default.svc.cluster.local",
            "type": "EDS",
            "transport_socket": _socket(UpstreamTlsContext, {
                "sni": "outbound_.9080_._.reviews.default.svc.cluster.local",
                "common_tls_context": _common(),
            }),
        },
        Cluster(),
    )  # fmt: skip
    listener = json_format.ParseDict(
        {
            "name": "virtualInbound",
            "filter_chains": [
                {
                    "filter_chain_match": {"transport_protocol": "tls"},
                    "transport_socket": _socket(DownstreamTlsContext, {
                        "require_client_certificate": True,
                        "common_tls_context": _common("OTHER-BUNDLE"),
                    }),
                },
                {"filter_chain_match": {"transport_protocol": "raw_buffer"}},
            ],
        },
        Listener(),
    )  # fmt: skip
    assert refs.sds_names([cluster], [listener]) == {"ROOTCA", "OTHER-BUNDLE"}
    assert refs.sds_names([Cluster(name="plain")], [Listener(name="plain")]) == frozenset()


@pytest.fixture
def credentials(tmp_path: Path):
    ca = CertificateAuthority.open(tmp_path / "ca", "cluster.local")
    identity = SpiffeId("cluster.local", "default", "reviews")
    key = new_private_key()
    issued = ca.sign_csr(load_csr(certificate_request(key, str(identity))), identity, 120)
    return read_issued_chain(issued.chain_pem, key, str(identity)), private_key_pem(key), ca


def test_the_workload_secret_is_istios_default_with_chain_and_key_inline(credentials):
    certificate, key_pem, _ = credentials
    secret = Secret.FromString(workload_secret(certificate.leaf_and_intermediates_pem, key_pem))
    assert SECRET_TYPE == "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
    assert secret.name == "default"
    assert secret.tls_certificate.certificate_chain.inline_bytes == certificate.leaf_and_intermediates_pem
    assert secret.tls_certificate.private_key.inline_bytes == key_pem


def test_the_engine_takes_the_secret_and_its_config_dump_shows_no_key(credentials):
    _core = pytest.importorskip("meshctl._core")
    from meshctl.agent.bootstrap import bootstrap_from_dict

    certificate, key_pem, _ = credentials
    engine = _core.Engine(bootstrap_from_dict({}), worker_threads=1)
    try:
        engine.apply(SECRET_TYPE, [workload_secret(certificate.leaf_and_intermediates_pem, key_pem)])
        dump = engine.config_dump()
    finally:
        engine.stop()
    body = key_pem.decode().splitlines()[1]
    assert "PRIVATE KEY" not in dump and body not in dump


def test_the_cert_dir_holds_chain_key_0600_and_roots(credentials, tmp_path: Path):
    certificate, key_pem, ca = credentials
    directory = tmp_path / "certs"
    roots = trust_bundle(ca.bundle_pem().encode(), certificate.root_pem)
    assert roots.count(b"BEGIN CERTIFICATE") == 1  # the same root twice is written once
    write_cert_dir(directory, certificate.leaf_and_intermediates_pem, key_pem, roots)
    assert (directory / "cert.pem").read_bytes() == certificate.leaf_and_intermediates_pem
    assert (directory / "key.pem").read_bytes() == key_pem
    assert (directory / "root.pem").read_bytes() == roots
    assert stat.S_IMODE((directory / "key.pem").stat().st_mode) == 0o600
    # Rewritten in place of the old ones, no temporary files left behind.
    write_cert_dir(directory, certificate.leaf_and_intermediates_pem, key_pem, roots)
    assert sorted(path.name for path in directory.iterdir()) == ["cert.pem", "key.pem", "root.pem"]


def test_the_trust_anchor_must_be_a_root_bundle_and_bad_bundles_from_ads_are_ignored(credentials, tmp_path: Path):
    from meshctl.agent.control_channels import ControlPlanes, TrustAnchorError

    _, _, ca = credentials
    plane = [("127.0.0.1", 15012)]
    with pytest.raises(TrustAnchorError, match="--ca-root"):
        ControlPlanes(plane, tmp_path / "missing.pem")
    garbled = tmp_path / "garbled.pem"
    garbled.write_text("-----BEGIN CERTIFICATE-----\nzzz\n-----END CERTIFICATE-----\n")
    with pytest.raises(TrustAnchorError, match="not a PEM root bundle"):
        ControlPlanes(plane, garbled)
    root_file = ca.write_bundle()
    planes = ControlPlanes(plane, root_file)
    planes.trust_roots(b"not a certificate")
    assert planes.extra_roots_pem == b""
    root_file.unlink()  # gone later: the roots read at the start still verify the planes
    assert b"BEGIN CERTIFICATE" in planes.roots_pem()
    assert planes.ssl_context(with_client_certificate=False) is not None
