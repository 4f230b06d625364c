"""A real Envoy as a mesh client sidecar without ADS: the plane's compiled outbound config for one
service, run from a file, with the workload certificate `meshctl identity agent` wrote (file SDS).

Why from a file: the compiled rate limit service cluster presents the `default` secret, which an
Envoy fed over ADS would have to get from the plane; the plane never holds a sidecar's key. Used by
the global rate limit tests and benchmarks/ratelimit_global.py."""

from __future__ import annotations

import copy
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from meshctl.control import compiler_ratelimit_global as global_limits
from meshctl.control import resource_types as types
from meshctl.control.compiler import cluster_name, compile_mesh, sidecar_resources
from meshctl.control.registry import Sidecar

from helpers.compiled_mesh import compiled_bootstrap
from helpers.control_plane import ControlPlane
from helpers.dataplane import start_dataplane
from helpers.envoy_sds import cert_dir_secrets, with_file_secrets
from helpers.ports import free_port
from helpers.procs import Process


def workload_certificate(plane: ControlPlane, service_account: str, directory: Path) -> Path:
    """A sidecar's certificate: `meshctl identity agent` with a join token writes cert.pem,
    key.pem and root.pem into `directory`; the agent is stopped (by its PID) once they exist."""
    env = {k: v for k, v in plane.env.items() if k != "MESHCTL_TOKEN"}
    log_path = directory.parent / f"{directory.name}.log"
    with open(log_path, "wb") as log:
        agent = subprocess.Popen(
            [sys.executable, "-m", "meshctl", "identity", "agent", "--token", plane.join_token(service_account),
             "--cert-dir", str(directory), "--xds-address", plane.xds_address],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not (directory / "root.pem").exists():
            assert agent.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=10)
    return directory


def stored_rate_limits(plane: ControlPlane) -> list[dict]:
    """The RateLimits as the plane stores them (what its compiler reads)."""
    shown = plane.meshctl("get", "ratelimit", "-o", "json")
    assert shown.returncode == 0, shown.stderr
    body = json.loads(shown.stdout)
    return [{k: item[k] for k in ("apiVersion", "kind", "metadata", "spec")} for item in body.get("items", [body])]


def start_client_envoy(
    plane: ControlPlane, service: str, host: str, service_port: int, app_port: int, directory: Path
) -> tuple[Process, int]:
    """An Envoy with `service`'s identity running the plane's compiled outbound config, whose
    `host:service_port` cluster reaches the app on `app_port` directly. Returns it (its admin port in
    `extra["admin_port"]`) and its listener's port."""
    directory.mkdir(parents=True, exist_ok=True)
    certs = workload_certificate(plane, service, directory / "certs")
    identity = f"spiffe://cluster.local/ns/default/sa/{service}"
    me = Sidecar(node_id=f"{service}-1", service=service, outbound_port=free_port(), identity=identity)
    name = host.split(".")[0]
    destination = Sidecar(node_id=f"{name}-1", service=name, service_port=service_port, app_port=app_port,
                          inbound_port=free_port(), ready=True)  # fmt: skip
    xds_host, xds_port = plane.xds_address.rsplit(":", 1)
    mesh = compile_mesh(stored_rate_limits(plane), [destination, me], global_limits.ServiceAddress(xds_host, int(xds_port)))
    resources = sidecar_resources(mesh, me)
    listener_port, admin_port = free_port(), free_port()
    config = compiled_bootstrap(resources, listener_port, admin_port,
                                {cluster_name("outbound", service_port, None, host): app_port})  # fmt: skip
    # The rate limit service's cluster, there when a global rule limits this sidecar.
    default, rootca = cert_dir_secrets(certs, directory)
    config["static_resources"]["clusters"].extend(
        with_file_secrets(copy.deepcopy(cluster), {"default": default, "ROOTCA": rootca})
        for cluster in resources[types.CLUSTER] if cluster["name"] == global_limits.CLUSTER
    )
    # The plane's cluster is mTLS only towards instances with identities: the destination has none.
    config["node"] = {"id": me.node_id, "cluster": service}
    config["admin"] = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}}
    envoy = start_dataplane("envoy", config, directory, wait_ports=[listener_port], timeout=30)
    envoy.extra["admin_port"] = admin_port
    return envoy, listener_port
