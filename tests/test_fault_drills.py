"""Fault drills under a steady 200 req/s: two instances of reviews behind their sidecars, a client
sidecar calling them, and one instance failing mid-load: its app killed, its sidecar killed, its
app answering 500 only, or its app hanging. The caller sees 0 failed requests, because its sidecar
retries on another instance and ejects the failing one (the DestinationRule's outlier detection).

Which retries: Istio's default policy when the app is killed (its sidecar drains, so callers
see refused streams and connect failures, which that policy retries). A VirtualService's
retries (`retryOn: 5xx,reset,connect-failure,refused-stream`) for the other drills: Istio's
default policy retries neither 500s nor hangs, nor requests in flight on a connection that a
killed sidecar resets (on Istio and Envoy these fail too; measured here: 2 of ~2,000)."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from helpers.control_plane import start_control_plane
from helpers.load import PacedLoad
from helpers.mesh import MeshSidecar, apply, ask_host, print_logs, stop_all, wait_until
from helpers.ports import free_port

pytestmark = pytest.mark.meshctl_only

SERVERS = Path(__file__).resolve().parent / "servers"
LEASE = 3.0
DRILL_SECONDS = 10.0
OUTLIER_DETECTION = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 3, interval: 1s, baseEjectionTime: 30s, maxEjectionPercent: 50}
"""
# Istio's default retry policy retries connect failures and 503s only: answers of 500 and hangs
# need the route's own retries (per-try timeout for the hang).
RETRIES = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - route: [{destination: {host: reviews}}]
    timeout: 5s
    retries: {attempts: 2, perTryTimeout: 0.5s, retryOn: "5xx,reset,connect-failure,refused-stream"}
"""


class Instance:
    """reviews behind its sidecar; its app tests/servers/flaky_app.py, switched by files."""

    def __init__(self, plane, directory: Path, name: str) -> None:
        self.fail_file, self.hang_file = directory / f"{name}.fail", directory / f"{name}.hang"
        app_port = free_port()
        app = [sys.executable, str(SERVERS / "flaky_app.py"), "--name", name, "--port", str(app_port),
               "--fail-file", str(self.fail_file), "--hang-file", str(self.hang_file)]  # fmt: skip
        self.sidecar = MeshSidecar(
            plane.env, directory, "reviews", "--version", "v1", "--app-port", str(app_port),
            "--service-port", "9080", "--inbound-port", str(free_port()), command=app, lease=LEASE,
        )  # fmt: skip
        self.apps: list[int] = []

    def note_app(self) -> None:
        self.apps = self.sidecar.children()

    def kill_apps(self) -> None:
        for pid in self.apps:
            try:
                if b"flaky_app.py" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def cause(drill: str, victim: Instance) -> None:
    if drill == "app-killed":
        victim.kill_apps()  # its sidecar sees the app exit, leaves the registry and drains
    elif drill == "sidecar-killed":
        victim.sidecar.popen.kill()  # the sidecar only: its app stays, unreachable
    elif drill == "answers-500":
        victim.fail_file.touch()
    elif drill == "hangs":
        victim.hang_file.touch()


@pytest.mark.parametrize("drill", ["app-killed", "sidecar-killed", "answers-500", "hangs"])
def test_one_instance_fails_under_load_and_the_caller_sees_no_failed_request(tmp_path: Path, drill: str):
    plane = start_control_plane(tmp_path / "plane", "--xds-port", "0")
    instances = [Instance(plane, tmp_path, name) for name in ("a", "b")]
    client = MeshSidecar(plane.env, tmp_path, "productpage", lease=LEASE)
    sidecars = [instance.sidecar for instance in instances] + [client]
    load = None
    try:
        apply(plane, OUTLIER_DETECTION + ("" if drill == "app-killed" else "---" + RETRIES))
        wait_until(lambda: {ask_host(client.outbound_port) for _ in range(10)} == {"a", "b"}, 40,
                   "the client reaches both instances")  # fmt: skip
        for instance in instances:
            instance.note_app()
        load = PacedLoad(client.outbound_port)
        load.start()
        time.sleep(2)
        before = load.count()
        struck = time.monotonic()
        cause(drill, instances[1])
        time.sleep(DRILL_SECONDS)
        load.stop()
        after = [answer for sent, answer in load.answers if sent >= struck]
        late = [answer for sent, answer in load.answers if sent >= struck + 2]
        print(f"{drill}: {before} requests before, {len(after)} in the {DRILL_SECONDS:.0f}s after: "
              f"{dict(Counter(after))}; from 2s after: {dict(Counter(late))}")  # fmt: skip
        assert len(after) > 150 * DRILL_SECONDS, len(after)
        assert load.failures({"a", "b"}) == [], Counter(a for _, a in load.failures({"a", "b"})).most_common(3)
        # The failing instance is out of the rotation soon (ejected or not ready): a answers.
        assert Counter(late)["a"] >= 0.95 * len(late), Counter(late)
    except BaseException:
        print_logs(sidecars, {"": plane})
        raise
    finally:
        if load is not None:
            load.stop()
        stop_all(sidecars, plane)
        for instance in instances:
            instance.kill_apps()
