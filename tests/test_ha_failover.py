"""HA: a real 3-member etcd cluster and two `meshctl serve` on it, each with its own sidecars
(reviews v1, v2 and a client). Under load, one etcd member (the leader) and one control plane
are SIGKILLed: no request fails anywhere, the dead plane's sidecars keep their last config, a
change made through the surviving plane reaches its sidecars, and once the dead plane is back
(same ports, same store) its sidecars reconnect and get the change made while it was away.

The single-plane case (SIGKILL under load, restart, the next change arrives) is
tests/test_control_plane_e2e.py::test_an_app_reaches_services_by_name_and_survives_a_control_plane_kill.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
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

def test_etcd_member_and_control_plane_killed_under_load(tmp_path: Path):
    started = time.monotonic()
    cluster = start_cluster(tmp_path / "etcd")
    ports_a = ("--api-port", str(free_port()), "--xds-port", str(free_port()))
    store_a = ("--store", cluster.url("ha", order=[0, 1, 2]))
    store_b = ("--store", cluster.url("ha", order=[2, 1, 0]))
    planes = {"a": start_control_plane(tmp_path / "a", *store_a, *ports_a)}
    # Plane b adopts a's generated CA from the shared store: sidecars of either plane trust each
    # other, and an agent failing over verifies the other plane with the same root.
    planes["b"] = start_control_plane(tmp_path / "b", *store_b, "--xds-port", str(free_port()))
    sidecars: dict[str, list[MeshSidecar]] = {"a": [], "b": []}
    loads: dict[str, Load] = {}
    try:
        for name, plane in planes.items():
            for version in ("v1", "v2"):
                sidecars[name].append(echo_instance(plane.env, tmp_path, "reviews", version))
            sidecars[name].append(MeshSidecar(plane.env, tmp_path, "productpage"))
        for name, plane in planes.items():
            wait_until(
                # The registry is shared through etcd: each plane knows both planes' instances.
                lambda plane=plane: sorted(s["version"] for s in registered(plane) if s["ready"]) == ["v1", "v1", "v2", "v2"]
                or registered(plane), 40, f"plane {name}: both planes' reviews v1, v2 ready",
            )  # fmt: skip
        clients = {name: group[-1] for name, group in sidecars.items()}

        # A change made through plane a reaches the sidecars of both.
        apply(planes["a"], rules(100, 0))
        start_loads(clients, loads, "plane %s's client")

        # Under load: the etcd leader and plane a die (SIGKILL, their own PIDs).
        leader = kill_leader_and_plane(cluster, planes["a"])
        killed = {name: len(load.answers) for name, load in loads.items()}
        time.sleep(1.0)
        for name, load in loads.items():
            during = load.answers[killed[name]:]
            assert len(during) > 10 and set(during) == {"v1"}, (name, Counter(during))

        # The surviving plane takes a change (its store fails over to another member) and its
        # sidecars follow; plane a's sidecars keep their last config meanwhile.
        changed = time.monotonic()
        wait_until(lambda: planes["b"].meshctl("apply", "-f", "-", stdin=rules(0, 100)).returncode == 0,
                   15, "apply through plane b with a member down", step=0.5)  # fmt: skip
        wait_until(moved_to(loads["b"], "v2"), 10, "plane b's client → v2")
        print(f"etcd member m{leader} and plane a killed; change via plane b reached its sidecar in "
              f"{time.monotonic() - changed:.2f}s")  # fmt: skip
        assert set(loads["a"].last(20)) == {"v1"}, Counter(loads["a"].last(20))

        # Plane a comes back on the same ports and store: its sidecars reconnect and get the
        # change made while it was away.
        back = time.monotonic()
        planes["a"] = start_control_plane(tmp_path / "a", *store_a, *ports_a)
        wait_until(moved_to(loads["a"], "v2"), 30, "after its restart, plane a's client → v2")
        print(f"plane a restarted; its sidecar had the change {time.monotonic() - back:.2f}s later")

        finish_loads(loads, "plane %s's client")
        took = time.monotonic() - started
        print(f"scenario took {took:.1f}s")
        assert took < 120, took
    except BaseException:
        print_logs([sidecar for group in sidecars.values() for sidecar in group], planes, cluster)
        raise
    finally:
        for load in loads.values():
            load.halt.set()
        stop_all([sidecar for group in sidecars.values() for sidecar in group], *planes.values())
        cluster.stop()
