"""HA with a shared registry: two `meshctl serve` on one real 3-member etcd cluster, sharing one
API token. reviews v1 registers through plane b, reviews v2 through plane a, and each plane has a
client sidecar; the agents of plane a list both planes (`--control-plane A,B`).

- every plane routes to every instance: plane a's client reaches v1, registered via plane b;
- under load, the etcd leader and plane a are SIGKILLed: no request fails; plane a's agents fail
  over to plane b and a change made there reaches them;
- plane a restarts on the same ports: it does not wait for (nor forget) sidecars it does not
  serve, and a change made through it reaches the sidecars now on plane b.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from helpers.control_plane import start_control_plane
from helpers.etcd_cluster import start_cluster
from helpers.mesh import (
    Load,
    MeshSidecar,
    apply,
    echo_instance,
    finish_loads,
    kill_leader_and_plane,
    moved_to,
    print_logs,
    registered,
    rules,
    start_loads,
    stop_all,
    wait_until,
)
from helpers.ports import free_port

pytestmark = [
    pytest.mark.meshctl_only,
    pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd not installed (Debian etcd-server)"),
]


def test_planes_share_instances_and_sidecars_fail_over(tmp_path: Path):
    started = time.monotonic()
    cluster = start_cluster(tmp_path / "etcd")
    store = ("--store", cluster.url("ha", order=[0, 1, 2]))
    args = {name: ("--api-port", str(free_port()), "--xds-port", str(free_port())) for name in "ab"}
    planes = {"a": start_control_plane(tmp_path / "a", *store, *args["a"])}
    # One token for both planes, so an agent can move from one to the other.
    token = tmp_path / "b" / "meshctl" / "api-token"
    token.parent.mkdir(parents=True)
    shutil.copy(planes["a"].token_path, token)
    token.chmod(0o600)
    # And one CA: plane b adopts a's generated root from the shared store, so sidecars of either
    # plane trust each other.
    planes["b"] = start_control_plane(tmp_path / "b", *store, *args["b"])
    both = f"{planes['a'].address},{planes['b'].address}"
    env_a = {**planes["a"].env, "MESHCTL_CONTROL_PLANE": both}
    env_b = {**planes["b"].env, "MESHCTL_CONTROL_PLANE": f"{planes['b'].address},{planes['a'].address}"}
    sidecars: list[MeshSidecar] = []
    loads: dict[str, Load] = {}
    try:
        sidecars.append(echo_instance(env_b, tmp_path, "reviews", "v1"))  # via plane b
        sidecars.append(echo_instance(env_a, tmp_path, "reviews", "v2"))  # via plane a
        clients = {"a": MeshSidecar(env_a, tmp_path, "productpage"),
                   "b": MeshSidecar(env_b, tmp_path, "productpage")}  # fmt: skip
        sidecars.extend(clients.values())
        for name, plane in planes.items():
            wait_until(
                lambda plane=plane: sorted(s["version"] for s in registered(plane) if s["ready"]) == ["v1", "v2"]
                or registered(plane), 40, f"plane {name} knows both instances",
            )  # fmt: skip

        # Plane a's client routes to v1, which only plane b registered; the change went via a.
        apply(planes["a"], rules(100, 0))
        start_loads(clients, loads, "client %s")

        kill_leader_and_plane(cluster, planes["a"])
        killed = time.monotonic()

        # Plane a's agents fail over to plane b (each says so), and b's changes reach them.
        for sidecar in (sidecars[1], clients["a"]):
            wait_until(lambda sidecar=sidecar: "now following" in sidecar.log(), 20, f"{sidecar.log_path.name} fails over")
        print(f"plane a's agents followed plane b {time.monotonic() - killed:.2f}s after the kill")
        wait_until(lambda: planes["b"].meshctl("apply", "-f", "-", stdin=rules(0, 100)).returncode == 0,
                   15, "apply through plane b with a member down", step=0.5)  # fmt: skip
        for name, load in loads.items():
            wait_until(moved_to(load, "v2"), 10, f"client {name} → v2 via plane b")

        # Plane a returns: nothing to wait for (registrations are in etcd), and it forgets no
        # one's status; a change made through it reaches the sidecars that now follow plane b.
        planes["a"] = start_control_plane(tmp_path / "a", *store, *args["a"])
        back = time.monotonic()
        apply(planes["a"], rules(100, 0))
        for name, load in loads.items():
            wait_until(moved_to(load, "v1"), 10, f"client {name} → v1 via restarted plane a")
        print(f"change through restarted plane a reached every client in {time.monotonic() - back:.2f}s")
        assert "waiting up to" not in planes["a"].log(), planes["a"].log()[-2000:]
        # Both clients' answers to that change are recorded (by plane b, which serves them).
        nodes = [next(s["nodeId"] for s in registered(planes["b"]) if s["outboundPort"] == client.outbound_port)
                 for client in clients.values()]  # fmt: skip

        def recorded() -> bool | str:
            shown = planes["b"].meshctl("get", "VirtualService", "reviews", "-o", "json").stdout
            return all(node in shown for node in nodes) or shown[-300:]

        wait_until(recorded, 10, "statuses of both clients", step=0.5)

        finish_loads(loads, "client %s")
        took = time.monotonic() - started
        print(f"scenario took {took:.1f}s")
        assert took < 90, took
    except BaseException:
        print_logs(sidecars, planes, cluster)
        raise
    finally:
        for load in loads.values():
            load.halt.set()
        stop_all(sidecars, *planes.values())
        cluster.stop()
