"""`meshctl top` against a real `meshctl serve`, real sidecars and a real upstream: a paced load
(a quarter of it answered 503 by the app, every answer 20 ms late) shows up as the rps, success
rate and latency the command reports; the live mode redraws in place and ends cleanly on Ctrl-C;
a sidecar that died is named below the table; bad input is refused by name."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import pytest
from helpers.control_plane import ControlPlane, start_control_plane
from helpers.mesh import MeshSidecar, echo_instance, registered, wait_until
from helpers.ports import free_port
from meshctl.cli._sidecar_scrape import read_admin
from meshctl.cli.top import REDRAW

pytestmark = pytest.mark.meshctl_only

THREADS = 4
RATE_PER_THREAD = 5.0  # requests per second each: 20 in all, well within what one app serves
DELAY_MS = 20
GHOST_LEASE = 10.0


class Mesh:
    """A control plane, reviews v1 (tests/servers/http_echo.py) and a productpage client sidecar."""

    def __init__(self, plane: ControlPlane, client: MeshSidecar, directory: Path) -> None:
        self.plane, self.client, self.directory = plane, client, directory

    def ask(self, fail: bool) -> str:
        """One request for reviews through the client sidecar (HTTP proxy mode); its status."""
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({"http": f"http://127.0.0.1:{self.client.outbound_port}"})
        )
        query = f"delay_ms={DELAY_MS}" + ("&status=503" if fail else "")
        try:
            with opener.open(f"http://reviews:9080/?{query}", timeout=5) as response:
                response.read()
                return str(response.status)
        except urllib.error.HTTPError as error:
            return str(error.code)
        except OSError as error:
            return f"error: {type(error).__name__}"

    def top(self, *args: str) -> subprocess.CompletedProcess:
        return self.plane.meshctl("top", *args)


class PacedLoad:
    """THREADS threads, each sending RATE_PER_THREAD requests a second on a fixed schedule, every
    fourth of them answered 503 by the app; counts the statuses it got."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.statuses: Counter = Counter()
        self.halt = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(THREADS)]

    def run(self) -> None:
        started = time.monotonic()
        sent = 0
        while not self.halt.is_set():
            status = self.mesh.ask(fail=sent % 4 == 3)
            with self.lock:
                self.statuses[status] += 1
            sent += 1
            self.halt.wait(max(0.0, started + sent / RATE_PER_THREAD - time.monotonic()))

    def __enter__(self) -> Self:
        self.started = time.monotonic()
        for thread in self.threads:
            thread.start()
        time.sleep(1.0)  # every thread on its schedule before anything is measured
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.halt.set()
        for thread in self.threads:
            thread.join(10)
        self.seconds = time.monotonic() - self.started

    def rate(self) -> float:
        return sum(self.statuses.values()) / self.seconds


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    directory = tmp_path_factory.mktemp("top")
    plane = start_control_plane(directory / "plane", "--xds-port", "0")
    sidecars: list[MeshSidecar] = []
    try:
        sidecars.append(echo_instance(plane.env, directory, "reviews", "v1"))
        client = MeshSidecar(plane.env, directory, "productpage")
        sidecars.append(client)
        wait_until(
            lambda: [s["ready"] for s in registered(plane) if s["service"] == "reviews"] == [True],
            30, "reviews v1 ready",
        )  # fmt: skip
        built = Mesh(plane, client, directory)
        wait_until(lambda: built.ask(fail=False) == "200", 15, "reviews through the client sidecar")
        yield built
    finally:
        for sidecar in sidecars:
            sidecar.stop()
        plane.stop()


def reviews_row(report: dict) -> dict:
    rows = [row for row in report["services"] if row["service"] == "reviews"]
    assert len(rows) == 1 and rows[0]["namespace"] == "default", report
    return rows[0]


def test_top_once_reports_the_load_rate_success_share_and_latency(mesh: Mesh):
    with PacedLoad(mesh) as load:
        shown = mesh.top("--once", "--interval", "3", "--routes", "-o", "json")
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    print(json.dumps(report, indent=1), load.statuses, f"{load.rate():.1f} rps sent")
    assert load.statuses.keys() == {"200", "503"}, load.statuses
    assert report["view"] == "outbound" and 2.5 <= report["seconds"] <= 4.5, report
    assert report["sidecarsRead"] == 2 and report["unreachable"] == {}, report
    row = reviews_row(report)
    # The rate the load kept, within a quarter (a window's edges cut a few requests off).
    assert abs(row["rps"] - load.rate()) <= 0.25 * load.rate(), (row, load.rate())
    # One request in four answered 503 (after the default retries, still 503: counted once).
    assert abs(row["successRate"] - 0.75) <= 0.08, row
    assert row["errors5xx"] >= 1 and row["sidecars"] == 1, row
    # Every answer is at least 20 ms late: in Envoy's (10, 25] bucket or above, never below.
    assert 10 <= row["p50Ms"] <= 100 and row["p50Ms"] <= row["p99Ms"] <= 500, row
    routes = {entry["route"]: entry for entry in report["routes"]}
    route = routes["outbound/reviews.default.svc.cluster.local:9080/0"]
    assert abs(route["rps"] - load.rate()) <= 0.25 * load.rate(), route
    assert route["p50Ms"] >= 10, route


def test_the_text_table_has_a_row_per_service_and_route(mesh: Mesh):
    with PacedLoad(mesh):
        shown = mesh.top("--once", "--interval", "2", "--routes")
    assert shown.returncode == 0, shown.stderr
    print(shown.stdout)
    lines = shown.stdout.splitlines()
    assert "callers' view (outbound)" in lines[0] and "2 of 2 sidecars read" in lines[0], lines
    header = next(line for line in lines if line.startswith("NAMESPACE"))
    assert header.split() == ["NAMESPACE", "SERVICE", "RPS", "SUCCESS", "P50", "P99", "SIDECARS"]
    row = next(line.split() for line in lines if line.split()[:2] == ["default", "reviews"])
    assert float(row[2]) > 5 and row[3].endswith("%") and row[4].endswith("ms"), row
    assert 60 <= float(row[3].rstrip("%")) <= 90 and row[6] == "1", row
    assert any(line.startswith("reviews.default:9080/0 ") for line in lines), lines
    assert "not read" not in shown.stdout and REDRAW not in shown.stdout


def test_a_route_named_by_its_virtual_service_has_its_own_row(mesh: Mesh):
    named = (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews}\n"
        "spec:\n  hosts: [reviews]\n  http:\n  - name: reviews-all\n"
        "    route:\n    - destination: {host: reviews}\n"
    )
    applied = mesh.plane.meshctl("apply", "-f", "-", stdin=named)
    assert applied.returncode == 0, applied.stderr
    try:
        wait_until(lambda: 'route="reviews-all"' in read_admin(mesh.client.admin_port), 10,
                   "the named route in the client sidecar")  # fmt: skip
        with PacedLoad(mesh):
            shown = mesh.top("--once", "--interval", "2", "--routes", "-o", "json")
    finally:
        deleted = mesh.plane.meshctl("delete", "VirtualService", "reviews")
        assert deleted.returncode == 0, deleted.stderr
    assert shown.returncode == 0, shown.stderr
    routes = {entry["route"]: entry for entry in json.loads(shown.stdout)["routes"]}
    assert routes["reviews-all"]["rps"] > 5 and routes["reviews-all"]["sidecars"] == 1, routes
    # A service filter keeps only the routes whose name says their host.
    filtered = mesh.top("reviews", "--once", "--interval", "0.5", "--routes", "-o", "json")
    assert filtered.returncode == 0, filtered.stderr
    assert "reviews-all" not in {e["route"] for e in json.loads(filtered.stdout)["routes"]}


def test_a_service_filter_keeps_its_row_only(mesh: Mesh):
    shown = mesh.top("reviews", "--once", "--interval", "0.5", "-o", "json")
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    assert [row["service"] for row in report["services"]] == ["reviews"], report
    assert reviews_row(report)["rps"] == 0 and reviews_row(report)["successRate"] is None


def read_until(fd: int, done, timeout: float) -> bytes:
    """Bytes from a pty's master side until done(bytes) or the timeout."""
    output = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not done(output):
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                output += os.read(fd, 65536)
            except OSError:  # the child closed the terminal
                break
    return output


def test_the_live_mode_redraws_in_place_and_ctrl_c_ends_it_cleanly(mesh: Mesh):
    master, slave = pty.openpty()
    redraw = REDRAW.encode()
    with PacedLoad(mesh):
        process = subprocess.Popen(
            [sys.executable, "-m", "meshctl", "top", "--interval", "0.7"],
            stdin=slave, stdout=slave, stderr=subprocess.PIPE, env=mesh.plane.env,
        )  # fmt: skip
        os.close(slave)
        try:
            output = read_until(master, lambda out: out.count(redraw) >= 3, 30)
            process.send_signal(signal.SIGINT)  # its own PID: Ctrl-C
            returncode = process.wait(10)
            output += read_until(master, lambda out: False, 0.3)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            os.close(master)
    text = output.decode(errors="replace")
    stderr = process.stderr.read().decode(errors="replace")
    print(text, stderr)
    frames = text.split(REDRAW)[1:]
    assert len(frames) >= 3, text
    # Each frame begins at the top of a cleared screen and holds the whole table again.
    for frame in frames[:3]:
        assert "NAMESPACE" in frame and "reviews" in frame, frame
    assert returncode == 0 and "Traceback" not in stderr, stderr


def test_json_without_once_streams_one_document_per_interval(mesh: Mesh):
    process = subprocess.Popen(
        [sys.executable, "-m", "meshctl", "top", "--interval", "0.5", "-o", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=mesh.plane.env, text=True,
    )  # fmt: skip
    watchdog = threading.Timer(30, process.kill)  # a hung top fails the test, never blocks it
    watchdog.start()
    try:
        lines = [process.stdout.readline() for _ in range(2)]
        process.send_signal(signal.SIGINT)  # its own PID
        returncode = process.wait(10)
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.kill()
            process.wait()
    documents = [json.loads(line) for line in lines]
    assert all(reviews_row(document) for document in documents), documents
    assert returncode == 0, process.stderr.read()


def test_the_control_plane_going_away_keeps_top_reading_the_last_sidecars(tmp_path: Path):
    plane = start_control_plane(tmp_path / "plane", "--xds-port", "0")
    process = subprocess.Popen(
        [sys.executable, "-m", "meshctl", "top", "--interval", "0.5", "-o", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=plane.env, text=True,
    )  # fmt: skip
    watchdog = threading.Timer(40, process.kill)  # a hung top fails the test, never blocks it
    watchdog.start()
    try:
        first = json.loads(process.stdout.readline())
        plane.stop()
        later = json.loads(process.stdout.readline())
        while "registryError" not in later:  # a frame may have begun before the plane stopped
            later = json.loads(process.stdout.readline())
        process.send_signal(signal.SIGINT)  # its own PID
        returncode = process.wait(10)
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.kill()
            process.wait()
        plane.stop()
    assert "registryError" not in first and first["services"] == [], first
    assert "cannot reach the control plane" in later["registryError"], later
    assert returncode == 0, process.stderr.read()


def test_a_dead_sidecar_is_named_below_the_table_not_a_crash(mesh: Mesh):
    # Its registration outlives it by up to twice the lease: long enough for two runs of top,
    # short enough to be gone again before the next test, whatever the order.
    ghost = MeshSidecar(mesh.plane.env, mesh.directory, "ghost", lease=GHOST_LEASE)
    try:
        wait_until(lambda: any(s["service"] == "ghost" for s in registered(mesh.plane)), 30,
                   "ghost registered")  # fmt: skip
        node = next(s["nodeId"] for s in registered(mesh.plane) if s["service"] == "ghost")
        ghost.popen.kill()  # SIGKILL, its own PID: no deregistration
        ghost.popen.wait()
        report_run = mesh.top("--once", "--interval", "0.5", "-o", "json")
        text_run = mesh.top("--once", "--interval", "0.5")
    finally:
        ghost.stop()
        wait_until(lambda: all(s["service"] != "ghost" for s in registered(mesh.plane)),
                   3 * GHOST_LEASE, "the dead sidecar's lease expired")  # fmt: skip
    assert report_run.returncode == 0, report_run.stderr
    report = json.loads(report_run.stdout)
    assert list(report["unreachable"]) == [node] and report["sidecarsRead"] == 2, report
    assert "connection refused" in report["unreachable"][node].lower(), report
    assert text_run.returncode == 0, text_run.stderr
    footer = text_run.stdout.splitlines()[-1]
    assert footer.startswith("not read: 1 sidecar: ") and node in footer, text_run.stdout
    assert "2 of 3 sidecars read" in text_run.stdout, text_run.stdout


def test_bad_input_is_refused_naming_what_is_wrong(mesh: Mesh):
    negative = mesh.top("--interval", "-1", "--once")
    assert negative.returncode == 2 and "--interval" in negative.stderr, negative.stderr
    zero = mesh.top("--interval", "0", "--once")
    assert zero.returncode == 2 and "longer than zero" in zero.stderr, zero.stderr
    unknown = mesh.top("nosuch", "--once")
    assert unknown.returncode == 2, unknown.stderr
    assert "no service 'nosuch' in namespace 'default'" in unknown.stderr, unknown.stderr
    assert "default/reviews" in unknown.stderr, unknown.stderr
    elsewhere = mesh.top("-n", "nowhere", "--once")
    assert elsewhere.returncode == 2, elsewhere.stderr
    assert "no service in namespace 'nowhere' (namespaces: default)" in elsewhere.stderr
    wrong_format = mesh.top("-o", "yaml", "--once")
    assert wrong_format.returncode == 2 and "--output 'yaml'" in wrong_format.stderr
    nowhere = f"127.0.0.1:{free_port()}"
    unreachable = mesh.top("--once", "--control-plane", nowhere)
    assert unreachable.returncode != 0, unreachable.stdout
    assert f"cannot reach the control plane at {nowhere}" in unreachable.stderr, unreachable.stderr
