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


class RecordingEngine:
    """A real engine; what the ADS client applies to it is also written down."""

    def __init__(self) -> None:
        from meshctl import _core
        from meshctl.agent.bootstrap import bootstrap_from_dict

        self.engine = _core.Engine(bootstrap_from_dict({}), worker_threads=1)
        self.applied: list[tuple[str, list[str]]] = []

    def apply(self, type_url: str, resources: list[bytes]) -> None:
        self.engine.apply(type_url, resources)
        message = refs.MESSAGE_TYPES[type_url]
        names = [message.FromString(raw).name if type_url == refs.SECRET else "" for raw in resources]
        self.applied.append((type_url, names))

    def remove(self, type_url: str, names: list[str]) -> None:
        self.engine.remove(type_url, names)


async def test_ads_asks_the_plane_for_rootca_and_referenced_secrets_never_default(credentials, nursery):
    """Against a tiny ADS server on a real socket: the trust bundle is asked for from the start,
    secrets the clusters name are added, `default` is never asked for, and one the plane sends
    anyway is not applied."""
    import trio
    from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest, DiscoveryResponse

    from meshctl.agent.ads_client import ADS_METHOD, AdsClient
    from meshctl.agent.backoff import Backoff
    from meshctl.grpc import serve_grpc

    pytest.importorskip("meshctl._core")
    _, _, ca = credentials
    bundle = ca.bundle_pem()
    cluster = json_format.ParseDict(
        {"name": "outbound|9080||reviews", "type": "EDS", "connect_timeout": "1s",
         "eds_cluster_config": {"eds_config": {"ads": {}, "resource_api_version": "V3"}},
         "transport_socket": _socket(UpstreamTlsContext, {"common_tls_context": _common("EXTRA")})},
        Cluster(),
    )  # fmt: skip
    secrets = {
        name: json_format.ParseDict({"name": name, "validation_context": {"trusted_ca": {"inline_string": bundle}}}, Secret())
        for name in ("ROOTCA", "EXTRA", "default")
    }  # fmt: skip
    requests: list[DiscoveryRequest] = []

    async def ads(stream) -> None:
        answered: dict[str, list[str]] = {}
        while (raw := await stream.receive_message()) is not None:
            request = DiscoveryRequest.FromString(raw)
            requests.append(request)
            names = list(request.resource_names)
            if request.type_url in answered and answered[request.type_url] == names:
                continue  # an ACK
            answered[request.type_url] = names
            response = DiscoveryResponse(type_url=request.type_url, version_info="1", nonce=str(len(requests)))
            if request.type_url == refs.SECRET:
                # The plane also sends a `default` of its own: the agent must not take it.
                for name in [*names, "default"]:
                    response.resources.add().Pack(secrets[name])
            elif request.type_url == refs.CLUSTER:
                response.resources.add().Pack(cluster)
            await stream.send_message(response.SerializeToString())

    host, port = await nursery.start(serve_grpc, {ADS_METHOD: ads}, "127.0.0.1", 0)
    engine = RecordingEngine()
    seen: list[str] = []
    client = AdsClient(engine, (host, port), "reviews-1", backoff=Backoff(0.05, 0.1),
                       pinned_secrets=frozenset({"ROOTCA"}), on_secret=lambda name, _: seen.append(name))  # fmt: skip
    try:
        nursery.start_soon(client.run)
        with trio.fail_after(10):
            while client.status()[refs.SECRET]["names"] != ["EXTRA", "ROOTCA"]:
                await trio.sleep(0.02)
        asked = [list(r.resource_names) for r in requests if r.type_url == refs.SECRET]
        assert asked[0] == ["ROOTCA"]  # before the clusters: the bundle is always needed
        assert ["EXTRA", "ROOTCA"] in asked
        assert all("default" not in names for names in asked)
        applied = [names for type_url, names in engine.applied if type_url == refs.SECRET]
        assert applied and all("default" not in names for names in applied)
        assert "ROOTCA" in seen and "default" not in seen
    finally:
        nursery.cancel_scope.cancel()
        engine.engine.stop()
