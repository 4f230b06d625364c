"""Interop: a real Envoy 1.40 holding a certificate from our CA, through the files
`meshctl identity agent` writes and rotates, talks mTLS (h2) to a `meshctl run` sidecar.

The Envoy reads cert.pem/key.pem/root.pem through file-based SDS with `watched_directory`, so
each atomic rewrite at renewal is picked up; the sidecar's app sees Envoy's SPIFFE ID in
x-forwarded-client-cert, and after a renewal the Hash of the newly presented certificate."""

from __future__ import annotations

import hashlib
import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from helpers import bootstrap as b
from helpers.control_plane import start_control_plane
from helpers.dataplane import start_dataplane
from helpers.envoy_sds import cert_dir_secrets
from helpers.ports import free_port
from test_agent_identity_e2e import Sidecar

pytestmark = pytest.mark.meshctl_only

UPSTREAM_TLS_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
REVIEWS_ID = "spiffe://cluster.local/ns/default/sa/reviews"
ENVOY_ID = "spiffe://cluster.local/ns/default/sa/envoy-client"


def envoy_client(listener_port: int, sidecar_inbound: int, certs: Path, directory: Path) -> dict:
    """Plain HTTP in on `listener_port`; out over mTLS h2 to the sidecar's inbound port, with the
    cert dir's files as file-based SDS secrets that Envoy reloads when the directory changes."""
    default, rootca = cert_dir_secrets(certs, directory)
    upstream = b.cluster("reviews", sidecar_inbound, http2=True)
    # A connection per request, so each one presents the certificate Envoy holds right now.
    upstream["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"][
        "common_http_protocol_options"
    ] = {"max_requests_per_connection": 1}
    upstream["transport_socket"] = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": UPSTREAM_TLS_TYPE,
            "sni": "outbound_.9080_._.reviews.default.svc.cluster.local",
            "common_tls_context": {
                "alpn_protocols": ["h2"],
                "tls_certificate_sds_secret_configs": [default],
                "combined_validation_context": {
                    "default_validation_context": {
                        "match_typed_subject_alt_names": [
                            {"san_type": "URI", "matcher": {"exact": REVIEWS_ID}}
                        ]
                    },
                    "validation_context_sds_secret_config": rootca,
                },
            },
        },
    }
    routes = b.route_configuration("local", [b.virtual_host("all", [b.route("reviews")])])
    # SDS wants a node, even from a file.
    node = {"id": "envoy-client", "cluster": "envoy-client"}
    return b.bootstrap([b.http_listener("http", listener_port, routes)], [upstream], node=node)


def ask(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/who", timeout=5) as response:
        return json.loads(response.read())


def xfcc(answer: dict) -> dict[str, str]:
    header = answer["headers"].get("x-forwarded-client-cert", "")
    return dict(part.split("=", 1) for part in header.split(";") if "=" in part)


def leaf_hash(path: Path) -> str:
    certificate = x509.load_pem_x509_certificate(path.read_bytes())
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()


def test_envoy_with_our_rotated_files_talks_mtls_to_our_sidecar(tmp_path: Path):
    plane = start_control_plane(tmp_path / "data")
    started: list = []
    try:
        app_port, inbound_port, envoy_port = free_port(), free_port(), free_port()
        reviews = Sidecar(
            plane, tmp_path, "reviews", plane.join_token("reviews"),
            "--app-port", str(app_port), "--inbound-port", str(inbound_port), "--service-port", "9080",
            command=[sys.executable, str(Path(__file__).parent / "servers" / "http_echo.py"),
                     "--name", "reviews", "--port", str(app_port)],
        )  # fmt: skip
        started.append(reviews)
        reviews.wait_for(r"instance reviews\.default-\w+ ready", 30)

        certs = tmp_path / "envoy-certs"
        env = {k: v for k, v in plane.env.items() if k != "MESHCTL_TOKEN"}
        agent_log = tmp_path / "identity-agent.log"
        with open(agent_log, "wb") as log:
            agent = subprocess.Popen(
                [sys.executable, "-m", "meshctl", "identity", "agent",
                 "--token", plane.join_token("envoy-client"), "--cert-dir", str(certs),
                 "--cert-ttl", "1m", "--xds-address", plane.xds_address],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            )  # fmt: skip
        started.append(agent)
        deadline = time.monotonic() + 30
        while not (certs / "root.pem").exists():
            assert agent.poll() is None and time.monotonic() < deadline, agent_log.read_text()
            time.sleep(0.1)

        envoy = start_dataplane("envoy", envoy_client(envoy_port, inbound_port, certs, tmp_path), tmp_path)
        started.append(envoy)
        first = ask(envoy_port)
        details = xfcc(first)
        assert details["URI"] == ENVOY_ID and details["By"] == REVIEWS_ID, first
        assert details["Hash"] == leaf_hash(certs / "cert.pem")

        # A 1-minute certificate is renewed after about 30 s; Envoy picks the new files up.
        renewed = re.compile(r"certificate renewed for \S+: serial ([0-9a-f]+)")
        deadline = time.monotonic() + 60
        while not renewed.search(agent_log.read_text()):
            assert time.monotonic() < deadline, agent_log.read_text()
            time.sleep(0.5)
        new_hash = leaf_hash(certs / "cert.pem")
        assert new_hash != details["Hash"]
        deadline = time.monotonic() + 10
        while (seen := xfcc(ask(envoy_port))["Hash"]) != new_hash:
            assert time.monotonic() < deadline, f"Envoy still presents {seen}"
            time.sleep(0.2)
    finally:
        for process in reversed(started):
            if isinstance(process, subprocess.Popen):
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=10)
            else:
                process.stop()
        plane.stop()
