"""A real Envoy 1.40 as a client sidecar in the mesh: registered with `meshctl serve`, every
listener, route, cluster and endpoint from the plane's ADS over TLS, as `meshctl run` gets them.

How the plane lets it in (python/meshctl/control/identity_grpc.authenticated_ads): ADS on the TLS
xDS port needs a client certificate from the mesh CA or the API token; Envoy sends the token as
gRPC initial metadata (`authorization: Bearer ...`) and verifies the plane's server certificate
against the CA root in the plane's data dir. The plane compiles a snapshot only for registered
nodes (control/registry.py), so the Envoy is registered first under its node id, by the REST API,
as a pure client (no app port: never an endpoint) whose outbound listener is its own port.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ads_helpers.running import envoy_ads_bootstrap

from .control_plane import ControlPlane
from .dataplane import start_dataplane
from .mesh import wait_until
from .ports import free_port
from .procs import Process


def register(plane: ControlPlane, node_id: str, **fields: object) -> dict:
    """PUT /v1/sidecars/{node_id} (registry.parse_registration's fields) with the API token."""
    return plane.api("PUT", f"/v1/sidecars/{node_id}", {"leaseSeconds": 600, **fields})


def root_bundle(plane: ControlPlane) -> Path:
    """The CA roots the plane's xDS server certificate chains to."""
    return plane.data_dir / "meshctl" / "ca" / "root-bundle.pem"


def admin_get(port: int, path: str) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return response.read().decode()


@dataclass
class EnvoySidecar:
    """One Envoy fed by the plane over ADS; stopped by its own PID, then deregistered."""

    plane: ControlPlane
    node_id: str
    process: Process
    outbound_port: int
    admin_port: int

    def stats(self) -> dict[str, int]:
        """Envoy's counters and gauges from admin /stats, by full stat name."""
        values = {}
        for line in admin_get(self.admin_port, "/stats").splitlines():
            name, _, value = line.partition(": ")
            if value.strip().isdigit():
                values[name] = int(value)
        return values

    def counter(self, cluster: str, name: str) -> int:
        """Envoy's `cluster.<cluster>.<name>` (0 until Envoy has made it)."""
        return self.stats().get(f"cluster.{cluster}.{name}", 0)

    def config_dump(self) -> dict:
        return json.loads(admin_get(self.admin_port, "/config_dump"))

    def received(self) -> tuple[set[str], set[str]]:
        """(dynamic cluster names, dynamic route configuration names) Envoy took from ADS."""
        clusters: set[str] = set()
        routes: set[str] = set()
        for config in self.config_dump()["configs"]:
            kind = config["@type"].rsplit(".", 1)[-1]
            if kind == "ClustersConfigDump":
                clusters |= {c["cluster"]["name"] for c in config.get("dynamic_active_clusters", [])}
            elif kind == "RoutesConfigDump":
                routes |= {r["route_config"]["name"] for r in config.get("dynamic_route_configs", [])}
        return clusters, routes

    def dynamic_cluster(self, name: str) -> dict:
        """The active cluster `name` as Envoy holds it (after its own defaults and checks)."""
        for config in self.config_dump()["configs"]:
            for active in config.get("dynamic_active_clusters", []):
                if active["cluster"]["name"] == name:
                    return active["cluster"]
        raise KeyError(name)

    def wait_for(self, clusters: set[str], routes: set[str], timeout: float = 15.0) -> None:
        """Until Envoy holds at least these clusters and route configurations from ADS."""

        def holds() -> bool | tuple:
            have = self.received()
            return (clusters <= have[0] and routes <= have[1]) or have

        wait_until(holds, timeout, f"Envoy {self.node_id} receives {sorted(clusters)} and {sorted(routes)}", step=0.2)

    def wait_accepted(self, kind: str, name: str, timeout: float = 15.0) -> dict:
        """Until the plane records this Envoy's ACK of the config built from resource `kind`
        `name` (`meshctl get KIND NAME`'s status.sidecars); that resource's status."""
        status: dict = {}

        def accepted() -> bool | dict:
            nonlocal status
            shown = self.plane.meshctl("get", kind, name, "-o", "json")
            status = json.loads(shown.stdout)["status"] if shown.returncode == 0 else {"error": shown.stderr}
            return status.get("sidecars", {}).get(self.node_id, {}).get("state") == "accepted" or status

        wait_until(accepted, timeout, f"the plane records Envoy {self.node_id}'s ACK of {kind} {name}", step=0.3)
        return status

    def rejected_updates(self) -> int:
        """How many ADS updates Envoy NACKed, over every xDS type."""
        return sum(
            value for name, value in self.stats().items() if re.search(r"\.update_rejected$", name)
        )

    def log(self) -> str:
        return self.process.log()

    def stop(self) -> None:
        self.process.stop()
        try:
            self.plane.api("DELETE", f"/v1/sidecars/{self.node_id}")
        except (urllib.error.URLError, OSError):
            pass  # the plane is gone already; the lease ends it anyway


def start_envoy_sidecar(
    plane: ControlPlane, directory: Path, service: str, node_id: str | None = None, **registration: object
) -> EnvoySidecar:
    """Register `service`'s client sidecar under `node_id`, start Envoy on ADS, and wait for the
    outbound listener it receives to accept connections. `registration` adds fields (say appPort
    and inboundPort: an instance's sidecar, its inbound listener waited for too)."""
    node_id = node_id or f"{service}-envoy-{free_port()}"
    outbound_port, admin_port = free_port(), free_port()
    register(plane, node_id, service=service, outboundPort=outbound_port, adminPort=admin_port, **registration)
    config = envoy_ads_bootstrap(
        node_id, int(plane.xds_address.rsplit(":", 1)[1]), root_bundle(plane),
        plane.token_path.read_text().strip(),
    )  # fmt: skip
    # The node's cluster is its service, as istiod's injector sets it (service-cluster).
    config["node"]["cluster"] = service
    config["admin"] = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}}
    own = directory / node_id  # start_dataplane names its files by kind: one directory each
    own.mkdir(parents=True, exist_ok=True)
    inbound = [registration["inboundPort"]] if "inboundPort" in registration else []
    process = start_dataplane("envoy", config, own, wait_ports=[outbound_port, *inbound], timeout=30)
    return EnvoySidecar(plane, node_id, process, outbound_port, admin_port)
