"""`meshctl route show` and `route shift` see resilience, against real sidecars: a version whose
instance fails shows its retries and its ejected endpoint, and a canary whose failures were all
retried to success completes instead of rolling back (the users saw no failure)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.control_plane import start_control_plane
from helpers.ports import free_port
from test_control_plane_e2e import Sidecar, registered, wait_until
from test_route_cli import Mesh

pytestmark = pytest.mark.meshctl_only

# v2 has a healthy instance and one answering 500 to everything: its retries go to the healthy
# one and outlier detection ejects the failing one (for a minute: long enough to be seen). v3 is
# one instance answering 500 to 30 % of its requests: retried (up to 6 times) nearly always to
# success, with no outlier detection to take it away.
RESOURCES = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      outlierDetection: {consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 50}
  - name: v3
    labels: {version: v3}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - route: [{destination: {host: reviews, subset: v1}}]
    timeout: 10s
    retries: {attempts: 6, perTryTimeout: 2s, retryOn: 5xx}
"""
INSTANCES = (("v1", 0.0), ("v2", 0.0), ("v2", 1.0), ("v3", 0.3))


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    directory = tmp_path_factory.mktemp("route-resilience")
    plane = start_control_plane(directory / "plane", "--xds-port", "0")
    sidecars: list[Sidecar] = []
    try:
        applied = plane.meshctl("apply", "-f", "-", stdin=RESOURCES)
        assert applied.returncode == 0, applied.stderr
        for version, fail_rate in INSTANCES:
            app_port = free_port()
            sidecars.append(
                Sidecar(
                    plane, directory, "reviews", "--version", version, "--app-port", str(app_port),
                    "--service-port", "9080", "--inbound-port", str(free_port()),
                    command=[sys.executable, "-m", "meshctl.demo.apps", "details", "--port", str(app_port),
                             "--version", version, "--fail-rate", str(fail_rate)],
                )
            )  # fmt: skip
        client = Sidecar(plane, directory, "productpage")
        sidecars.append(client)

        def ready() -> object:
            found = sorted(
                s["version"] for s in registered(plane) if s["service"] == "reviews" and s["ready"]
            )
            return found == ["v1", "v2", "v2", "v3"] or found

        wait_until(ready, 30, "four reviews instances ready")
        mesh = Mesh(plane, client)
        wait_until(lambda: set(mesh.versions(3)) == {"v1"} or mesh.versions(3), 10,
                   "reviews v1 reached through the client sidecar")  # fmt: skip
        yield mesh
    finally:
        for sidecar in sidecars:
            sidecar.stop()
        plane.stop()


def test_route_show_reports_retries_and_the_ejected_instance(mesh: Mesh):
    mesh.set("--weights", "v1=40,v2=30,v3=30")
    wait_until(lambda: {"v2", "v3"} <= set(mesh.versions(20)) or mesh.versions(20), 10, "40/30/30")
    stop, threads = mesh.traffic()
    try:
        # The failing v2 instance is ejected after its second 5xx in a row, and stays out.
        shown = mesh.plane.meshctl("route", "show", "reviews", "--window", "3s", "-o", "json")
        text = mesh.plane.meshctl("route", "show", "reviews", "--window", "2s")
    finally:
        stop.set()
        for thread in threads:
            thread.join(5)
    assert shown.returncode == 0, shown.stderr
    versions = json.loads(shown.stdout)["live"]["versions"]
    print(json.dumps(versions, indent=1), text.stdout, sep="\n")
    v2, v3 = versions["v2"], versions["v3"]
    assert v2["ejectedEndpoints"] == 1 and versions["v1"]["ejectedEndpoints"] == 0, versions
    assert v3["retries"] >= 5 and v3["retrySuccesses"] >= 3, v3
    # Per request as the client saw it: tries include the retries, requests do not.
    assert v3["tries"] >= v3["requests"] + v3["retries"] - 4, v3
    assert v3["errors5xx"] <= 0.1 * v3["requests"], v3
    assert all(entry["fallbacks"] == 0 and entry["overflows"] == 0 for entry in versions.values())
    assert text.returncode == 0, text.stderr
    header = next(line for line in text.stdout.splitlines() if "VERSION" in line)
    assert header.split() == ["VERSION", "REQUESTS", "SHARE", "5XX", "RPS", "RETRIES", "(OK)",
                              "EJECTED", "OVERFLOW", "FALLBACKS"], header  # fmt: skip
    row = next(line for line in text.stdout.splitlines() if line.split()[:1] == ["v2"])
    assert row.split()[7] == "1", row  # EJECTED


def test_shift_does_not_roll_back_when_retries_hid_every_failure(mesh: Mesh):
    mesh.set("--weights", "v1=100")
    stop, threads = mesh.traffic()
    try:
        shift = mesh.plane.meshctl(
            "route", "shift", "reviews", "--from", "v1", "--to", "v3", "--step", "50",
            "--interval", "1s", "--max-error-rate", "10%", "--min-requests", "10",
        )  # fmt: skip
    finally:
        stop.set()
        for thread in threads:
            thread.join(5)
    print(shift.stdout, shift.stderr)
    assert shift.returncode == 0, shift.stdout + shift.stderr
    assert "done: reviews is v3=100" in shift.stdout, shift.stdout
    # Nearly a third of v3's tries failed, and the verdicts say its retries absorbed them.
    verdicts = [line for line in shift.stdout.splitlines() if "retries of which" in line]
    assert verdicts and any(" 0 retries" not in line for line in verdicts), shift.stdout
