"""Interop, the other way round: a `meshctl run` sidecar calls a real Envoy 1.40 that serves the
mesh service `ratings` over mTLS with a certificate from our control plane's CA.

The Envoy gets its files from `meshctl identity agent` and registers itself over the TLS xDS port
with that certificate, so the control plane records its verified identity and compiles an mTLS
cluster to it; the app behind Envoy sees our sidecar's SPIFFE ID in x-forwarded-client-cert."""

from __future__ import annotations

import json
import re
import signal
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import trio
from google.protobuf import json_format, struct_pb2
from helpers import bootstrap as b
from helpers.control_plane import ControlPlane, start_control_plane
from helpers.dataplane import start_dataplane
from helpers.envoy_sds import cert_dir_secrets
from helpers.mesh import MeshSidecar, wait_until
from helpers.ports import free_port
from helpers.procs import start_upstream

from meshctl.control.identity_grpc import REGISTER_METHOD
from meshctl.grpc import open_grpc_channel

pytestmark = pytest.mark.meshctl_only

DOWNSTREAM_TLS_TYPE = (
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
)
RATINGS_ID = "spiffe://cluster.local/ns/default/sa/ratings"
PRODUCTPAGE_ID = "spiffe://cluster.local/ns/default/sa/productpage"


def envoy_server(
    listener_port: int, admin_port: int, app_port: int, certs: Path, directory: Path
) -> dict:
    """mTLS in on `listener_port` (a client certificate from our CA required, any SPIFFE ID of the
    trust domain), the peer's URI put in x-forwarded-client-cert, plain HTTP/1.1 to the app."""
    default, rootca = cert_dir_secrets(certs, directory)
    routes = b.route_configuration("inbound", [b.virtual_host("all", [b.route("app")])])
    hcm = b.http_connection_manager(
        routes, stat_prefix="inbound_http",
        forward_client_cert_details="SANITIZE_SET", set_current_client_cert_details={"uri": True},
    )  # fmt: skip
    tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": DOWNSTREAM_TLS_TYPE,
            "require_client_certificate": True,
            "common_tls_context": {
                "alpn_protocols": ["h2", "http/1.1"],
                "tls_certificate_sds_secret_configs": [default],
                "combined_validation_context": {
                    "default_validation_context": {
                        "match_typed_subject_alt_names": [
                            {"san_type": "URI", "matcher": {"prefix": "spiffe://cluster.local/"}}
                        ]
                    },
                    "validation_context_sds_secret_config": rootca,
                },
            },
        },
    }
    inbound = b.listener("inbound", listener_port, [{"filters": [hcm], "transport_socket": tls}])
    return b.bootstrap(
        [inbound], [b.cluster("app", app_port)],
        admin={"address": b.socket_address(admin_port)},
        node={"id": "ratings-envoy", "cluster": "ratings"},  # SDS wants a node, even from a file
    )  # fmt: skip


async def _register(plane: ControlPlane, certs: Path, body: dict) -> dict:
    host, port = plane.xds_address.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(certs / "root.pem"))
    context.load_cert_chain(certs / "cert.pem", certs / "key.pem")
    message = struct_pb2.Struct()
    message.update(body)
    async with open_grpc_channel(
        host, int(port), ssl_context=context, connect_timeout=5
    ) as channel:
        answer = await channel.unary(REGISTER_METHOD, message.SerializeToString())
    return json_format.MessageToDict(struct_pb2.Struct.FromString(answer))["sidecar"]


def register_with_certificate(plane: ControlPlane, certs: Path, body: dict) -> dict:
    """Register over the TLS xDS port, authenticated by the client certificate in `certs`."""
    return trio.run(_register, plane, certs, body)


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=3) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")
    except OSError as error:
        return 0, f"{type(error).__name__}: {error}"


def test_our_sidecar_calls_envoy_serving_mtls_with_our_certificate(tmp_path: Path):
    plane = start_control_plane(tmp_path / "data")
    started: list = []
    try:
        certs = tmp_path / "ratings-certs"
        env = {k: v for k, v in plane.env.items() if k != "MESHCTL_TOKEN"}
        agent_log = tmp_path / "identity-agent.log"
        with open(agent_log, "wb") as log:
            agent = subprocess.Popen(
                [sys.executable, "-m", "meshctl", "identity", "agent",
                 "--token", plane.join_token("ratings"), "--cert-dir", str(certs),
                 "--xds-address", plane.xds_address],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            )  # fmt: skip
        started.append(agent)
        app = start_upstream("http_echo.py", tmp_path, "--name", "ratings")
        started.append(app)

        def certificate_written() -> bool | str:
            if agent.poll() is not None:
                return f"the agent exited: {agent_log.read_text()}"
            return (certs / "cert.pem").exists() and (certs / "root.pem").exists()

        wait_until(certificate_written, 30, "the agent's cert files")

        envoy_port, envoy_admin = free_port(), free_port()
        envoy = start_dataplane(
            "envoy", envoy_server(envoy_port, envoy_admin, app.port, certs, tmp_path), tmp_path
        )
        started.append(envoy)

        registration = register_with_certificate(plane, certs, {
            "nodeId": "ratings-envoy", "service": "ratings", "namespace": "default",
            "address": "127.0.0.1", "inboundPort": envoy_port, "appPort": app.port,
            "servicePort": 9080, "ready": True,
            "leaseSeconds": 600,  # outlives the test; the plane is stopped at the end anyway
        })  # fmt: skip
        assert registration["identity"] == RATINGS_ID, registration

        client = MeshSidecar(env, tmp_path, "productpage", "--token", plane.join_token("productpage"),
                             "--xds-address", plane.xds_address)  # fmt: skip
        started.append(client)
        url = f"http://127.0.0.1:{client.outbound_port}/x"
        answers: list = []

        def served() -> bool | tuple:
            answers.append(get(url, {"Host": "ratings:9080"}))
            return answers[-1][0] == 200 or answers[-1]

        wait_until(served, 30, "productpage -> ratings through Envoy", step=0.2)
        echoed = json.loads(answers[-1][1])
        assert echoed["name"] == "ratings" and echoed["path"] == "/x", echoed
        xfcc = dict(
            part.split("=", 1) for part in echoed["headers"]["x-forwarded-client-cert"].split(";")
        )
        assert xfcc["URI"] == PRODUCTPAGE_ID, echoed["headers"]
        assert xfcc["By"] == RATINGS_ID, echoed["headers"]

        _, stats = get(
            f"http://127.0.0.1:{envoy_admin}/stats?filter=^listener\\.127\\.0\\.0\\.1_{envoy_port}\\.ssl\\.handshake$"
        )
        handshakes = re.search(r"ssl\.handshake: (\d+)", stats)
        assert handshakes and int(handshakes.group(1)) > 0, stats

        # It was mTLS, not plaintext: the client's cluster for ratings is a TLS one to Envoy's
        # listener that accepts only the identity the control plane verified at registration.
        _, dump = get(f"http://127.0.0.1:{client.admin_port}/config_dump")
        clusters = {c["config"]["name"]: c for c in json.loads(dump)["clusters"]}
        ratings = clusters["outbound|9080||ratings.default.svc.cluster.local"]
        # (Each endpoint also carries the registry's workload metadata, for Istio's metrics.)
        addresses = [{key: e[key] for key in ("address", "weight")} for e in ratings["endpoints"]]
        assert addresses == [{"address": f"127.0.0.1:{envoy_port}", "weight": 1}], ratings
        tls = ratings["config"]["tls"]
        assert tls["certificate_source"] == "sds:default" and tls["alpn_protocols"] == ["h2"], tls
        validation = tls["server_validation"]
        assert validation["trust_source"] == "sds:ROOTCA", tls
        assert [san["pattern"] for san in validation["expected_uri_sans"]] == [
            {"kind": "exact", "value": RATINGS_ID}
        ], tls
    finally:
        for process in reversed(started):
            if isinstance(process, subprocess.Popen):
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)  # this PID only
                    process.wait(timeout=10)
            else:
                process.stop()
        plane.stop()
