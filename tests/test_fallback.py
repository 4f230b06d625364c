"""meshctl's Fallback (降级) end to end: a control plane, reviews instances behind their sidecars
(tests/servers/flaky_app.py, failing on demand), and a client sidecar whose engine applies the
Fallback: the destination breaker opening at its error ratio, the fixed response or the degraded
version answering instead (with x-meshctl-fallback), one half-open probe closing the breaker once
reviews recovers, and meshctl_fallback_total counting it all. meshctl only: Envoy has no such
thing (envoy#18624) and ignores the cluster metadata that carries it."""

from __future__ import annotations

import json
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from helpers.control_plane import start_control_plane
from helpers.mesh import MeshSidecar, apply, ask_host, print_logs, stop_all, wait_until
from helpers.ports import free_port

pytestmark = pytest.mark.meshctl_only

SERVERS = Path(__file__).resolve().parent / "servers"
HOST = "reviews.default.svc.cluster.local"
SUBSETS = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"""
TO_V2 = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - route: [{destination: {host: reviews, subset: v2}}]
"""
BREAKER_TO_RESPONSE = """
apiVersion: policy.meshctl.io/v1alpha1
kind: Fallback
metadata: {name: reviews}
spec:
  host: reviews
  breaker: {errorRatio: 0.5, minRequests: 5, window: 10s, openFor: 2s}
  to:
    response:
      status: 200
      headers: {content-type: application/json}
      body: '{"name": "fallback"}'
"""
TO_V1 = """
apiVersion: policy.meshctl.io/v1alpha1
kind: Fallback
metadata: {name: reviews}
spec:
  host: reviews
  on: [5xx, no-healthy-upstream]
  to:
    destination: {host: reviews, subset: v1}
"""


class Instance:
    """One version of reviews behind its sidecar, answering 500 while its fail file exists."""

    def __init__(self, plane, directory: Path, name: str, version: str) -> None:
        self.fail_file = directory / f"{name}.fail"
        app_port = free_port()
        app = [sys.executable, str(SERVERS / "flaky_app.py"), "--name", name, "--port", str(app_port),
               "--fail-file", str(self.fail_file), "--hang-file", str(directory / f"{name}.hang")]  # fmt: skip
        self.sidecar = MeshSidecar(
            plane.env, directory, "reviews", "--version", version, "--app-port", str(app_port),
            "--service-port", "9080", "--inbound-port", str(free_port()), command=app,
        )  # fmt: skip


def call(port: int) -> tuple[int, str, str | None]:
    """(status, the answering app's name, x-meshctl-fallback) of one request for reviews."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/", headers={"Host": "reviews:9080"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())["name"], response.headers.get("x-meshctl-fallback")
    except urllib.error.HTTPError as error:
        name = json.loads(error.read() or b"{}").get("name", "")
        return error.code, name, error.headers.get("x-meshctl-fallback")


def metric(sidecar: MeshSidecar, pattern: str) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{sidecar.admin_port}/stats/prometheus", timeout=3) as response:
        text = response.read().decode()
    found = re.search("^" + re.escape(pattern) + r" (\d+)$", text, re.MULTILINE)
    return int(found.group(1)) if found else -1


def with_fallback(plane, client: MeshSidecar, fallback: str) -> None:
    """Apply a Fallback once the client reaches reviews, and wait until its engine has it: the
    calls that found no endpoint yet are then not in the breaker's window."""
    wait_until(lambda: not ask_host(client.outbound_port).startswith(("HTTP", "error")), 40, "the client reaches reviews")
    apply(plane, fallback)
    wait_until(lambda: metric(client, f'meshctl_fallback_total{{host="{HOST}",reason="5xx"}}') == 0, 20,
               "the client's engine has the Fallback")  # fmt: skip


@pytest.fixture
def mesh(tmp_path: Path):
    plane = start_control_plane(tmp_path / "plane", "--xds-port", "0")
    started: list[MeshSidecar] = []

    def instance(name: str, version: str) -> Instance:
        made = Instance(plane, tmp_path, name, version)
        started.append(made.sidecar)
        return made

    def client() -> MeshSidecar:
        made = MeshSidecar(plane.env, tmp_path, "productpage")
        started.append(made)
        return made

    try:
        yield plane, instance, client
    except BaseException:
        print_logs(started, {"": plane})
        raise
    finally:
        stop_all(started, plane)


def test_the_breaker_opens_at_its_error_ratio_answers_the_fallback_and_a_probe_closes_it(mesh):
    plane, instance, client = mesh
    reviews = instance("a", "v1")
    productpage = client()
    with_fallback(plane, productpage, BREAKER_TO_RESPONSE)
    assert [call(productpage.outbound_port) for _ in range(5)] == [(200, "a", None)] * 5

    reviews.fail_file.touch()
    failing = [call(productpage.outbound_port) for _ in range(20)]
    # Every failed call gets the fallback at once (reason 5xx); the 50 % error ratio is reached
    # at the 10th call of the window (5 good, 5 failed): from then on, the breaker answers.
    assert failing[:5] == [(200, "fallback", "5xx")] * 5, failing
    assert failing[5:] == [(200, "fallback", "breaker-open")] * 15, failing
    assert metric(productpage, f'meshctl_fallback_breaker_open{{cluster="outbound|9080||{HOST}"}}') == 1
    before = productpage.upstream_requests()[f"outbound|9080||{HOST}"]
    call(productpage.outbound_port)
    assert productpage.upstream_requests()[f"outbound|9080||{HOST}"] == before, "an open breaker sends nothing"

    reviews.fail_file.unlink()
    time.sleep(2.2)  # openFor: the next request is the half-open probe, and it succeeds
    assert [call(productpage.outbound_port) for _ in range(5)] == [(200, "a", None)] * 5
    assert metric(productpage, f'meshctl_fallback_breaker_open{{cluster="outbound|9080||{HOST}"}}') == 0
    assert metric(productpage, f'meshctl_fallback_total{{host="{HOST}",reason="5xx"}}') == 5
    assert metric(productpage, f'meshctl_fallback_total{{host="{HOST}",reason="breaker-open"}}') == 16
    assert metric(productpage, f'meshctl_upstream_rq_fallback_total{{cluster="outbound|9080||{HOST}"}}') == 21


def test_a_failed_probe_opens_the_breaker_again(mesh):
    plane, instance, client = mesh
    reviews = instance("a", "v1")
    productpage = client()
    with_fallback(plane, productpage, BREAKER_TO_RESPONSE)
    reviews.fail_file.touch()
    assert [call(productpage.outbound_port)[2] for _ in range(6)] == ["5xx"] * 5 + ["breaker-open"]
    time.sleep(2.2)
    assert call(productpage.outbound_port) == (200, "fallback", "5xx"), "the probe failed"
    assert call(productpage.outbound_port) == (200, "fallback", "breaker-open"), "open again at once"


def test_a_failing_version_falls_back_to_the_degraded_one(mesh):
    plane, instance, client = mesh
    instance("stable", "v1")
    v2 = instance("new", "v2")
    productpage = client()
    apply(plane, SUBSETS + "---" + TO_V2)
    wait_until(lambda: ask_host(productpage.outbound_port) == "new", 40, "the client reaches reviews v2")
    with_fallback(plane, productpage, TO_V1)
    assert call(productpage.outbound_port) == (200, "new", None)

    v2.fail_file.touch()
    assert [call(productpage.outbound_port) for _ in range(10)] == [(200, "stable", "5xx")] * 10
    v2.fail_file.unlink()
    assert call(productpage.outbound_port) == (200, "new", None)

    v2.sidecar.stop()  # v2 leaves the registry: no endpoint is left in its cluster
    wait_until(lambda: call(productpage.outbound_port) == (200, "stable", "no-healthy-upstream"), 20,
               "v1 answers for the departed v2")  # fmt: skip
    assert metric(productpage, f'meshctl_fallback_total{{host="{HOST}",reason="5xx"}}') == 10


@pytest.mark.parametrize(
    ("change", "field", "reason"),
    [
        (("errorRatio: 0.5", "errorRatio: 1.5"), "spec.breaker.errorRatio", "less than or equal to 1"),
        (("openFor: 2s", "openFor: -2s"), "spec.breaker.openFor", "is not a duration"),
        (("minRequests: 5", "minRequests: 0"), "spec.breaker.minRequests", "greater than or equal to 1"),
        (("  breaker:", "  on: [5xx]\n  breaker:"), "spec.on", "omits breaker-open"),
        (("status: 200", "status: 99"), "spec.to.response.status", "greater than or equal to 200"),
    ],
)
def test_bad_fallbacks_are_refused_naming_the_field_and_nothing_changes(tmp_path, change, field, reason):
    plane = start_control_plane(tmp_path / "plane", "--xds-port", "0")
    try:
        apply(plane, BREAKER_TO_RESPONSE)
        stored = plane.meshctl("get", "fallback", "reviews", "-o", "yaml").stdout
        done = plane.meshctl("apply", "-f", "-", stdin=BREAKER_TO_RESPONSE.replace(*change))
        assert done.returncode == 2, done.stderr
        assert f"Fallback default/reviews: {field}" in done.stderr and reason in done.stderr, done.stderr
        assert plane.meshctl("get", "fallback", "reviews", "-o", "yaml").stdout == stored
    finally:
        plane.stop()


def test_a_fallback_to_an_undefined_subset_is_refused(tmp_path):
    plane = start_control_plane(tmp_path / "plane", "--xds-port", "0")
    try:
        done = plane.meshctl("apply", "-f", "-", stdin=TO_V1)
        assert done.returncode == 2, done.stderr
        assert "Fallback default/reviews: spec.to.destination.subset" in done.stderr, done.stderr
        assert "subset 'v1' is not defined" in done.stderr, done.stderr
        assert "reviews" not in plane.meshctl("get", "fallbacks").stdout
    finally:
        plane.stop()
