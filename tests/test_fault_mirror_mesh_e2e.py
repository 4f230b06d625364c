"""End to end through the mesh: `meshctl serve`, reviews v1 and v2 and a productpage client under
`meshctl run`; `meshctl apply` of Istio's fault-injection and mirroring YAML reaches the sidecars
over ADS, every sidecar accepts it, and the client's sidecar enforces it."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from helpers.control_plane import start_control_plane
from helpers.mesh import MeshSidecar, apply, destination_rule, echo_instance, print_logs, registered, stop_all, wait_until
from helpers.ports import free_port

pytestmark = pytest.mark.meshctl_only

FAULT_AND_MIRROR = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - match:
    - headers: {end-user: {exact: jason}}
    fault:
      delay: {percentage: {value: 100.0}, fixedDelay: 500ms}
      abort: {percentage: {value: 100.0}, httpStatus: 500}
    route:
    - destination: {host: reviews, subset: v1}
  - route:
    - destination: {host: reviews, subset: v1}
      weight: 100
    mirror: {host: reviews, subset: v2}
"""


def status_of(port: int, headers: dict[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/", headers={"Host": "reviews:9080", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())["name"]
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_fault_and_mirror_applied_through_the_control_plane(tmp_path: Path):
    plane = start_control_plane(tmp_path / "plane", "--xds-port", str(free_port()))
    sidecars: list[MeshSidecar] = []
    try:
        sidecars += [echo_instance(plane.env, tmp_path, "reviews", v, lease=1.5) for v in ("v1", "v2")]
        client = MeshSidecar(plane.env, tmp_path, "productpage", lease=1.5)
        sidecars.append(client)
        wait_until(lambda: sum(1 for s in registered(plane) if s["service"] == "reviews" and s["ready"]) == 2,
                   30, "both reviews instances ready")  # fmt: skip
        apply(plane, destination_rule("v1", "v2") + "---\n" + FAULT_AND_MIRROR)

        def accepted() -> object:
            shown = plane.meshctl("get", "vs", "reviews", "-o", "json")
            states = json.loads(shown.stdout)["status"]["sidecars"] if shown.returncode == 0 else {}
            return sorted(entry["state"] for entry in states.values()) == ["accepted"] * 3 or states

        wait_until(accepted, 10, "every sidecar accepts the fault and the mirror")
        wait_until(lambda: status_of(client.outbound_port, {"end-user": "jason"})[0] == 500, 5, "jason's requests abort")
        started = time.monotonic()
        assert status_of(client.outbound_port, {"end-user": "jason"}) == (500, "fault filter abort")
        assert time.monotonic() - started >= 0.45, "the delay comes before the abort"

        before = client.upstream_requests()
        answers = [status_of(client.outbound_port) for _ in range(10)]
        assert answers == [(200, "v1")] * 10, "the client sees v1 only"

        def mirrored() -> object:
            grown = {name: count - before.get(name, 0) for name, count in client.upstream_requests().items()}
            v2 = sum(count for name, count in grown.items() if name.startswith("outbound|9080|v2|"))
            return v2 == 10 or grown

        wait_until(mirrored, 5, "ten copies counted on the client's v2 cluster")
    except BaseException:
        print_logs(sidecars, {"": plane}, sidecar_tail=3000, plane_tail=4000)
        raise
    finally:
        stop_all(sidecars, plane)
