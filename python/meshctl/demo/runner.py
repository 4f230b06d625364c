"""`meshctl demo`: a whole mesh on this machine: the control plane on a SQLite store in a temp
dir, bookinfo-like services each behind its own sidecar, traffic, and the live split of reviews
requests across versions while the weights shift. Every process it starts is ended by its PID.
"""

from __future__ import annotations

import http.client
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from meshctl.cli.route import (
    Scrape,
    VersionCount,
    apply_plan,
    describe_weights,
    plan,
    read_routing,
    scrape,
    service_host,
    split_between,
)
from meshctl.control.client import Client, ClientError

if TYPE_CHECKING:
    from meshctl.dashboard.server import Dashboard

SERVICE_PORT = 9080
LEASE_SECONDS = 2.0
# (service, version): productpage calls reviews and details; reviews v2 and v3 call ratings.
INSTANCES = [
    ("productpage", "v1"),
    ("details", "v1"),
    ("reviews", "v1"),
    ("reviews", "v2"),
    ("reviews", "v3"),
    ("ratings", "v1"),
]
SHIFT_PHASES = [{"v1": 100}, {"v1": 50, "v3": 50}, {"v3": 100}]
EVEN_SPLIT = {"v1": 34, "v2": 33, "v3": 33}
DEFAULT_PHASE_SECONDS = 15.0
TRAFFIC_THREADS = 3
TRAFFIC_PAUSE = 0.03  # between one thread's requests: a few dozen requests/s in all
STARTUP_TIMEOUT = 90.0


class DemoFailed(Exception):
    pass


def _free_port() -> int:
    # Below the ephemeral range, so the demo's own outgoing connections never take one first.
    for _ in range(200):
        port = random.randint(20000, 32000)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise DemoFailed("no free loopback port")


@dataclass
class Child:
    name: str
    popen: subprocess.Popen
    log_path: Path
    outbound_port: int | None = None
    grandchildren: set[int] = field(default_factory=set)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def note_grandchildren(self) -> None:
        """The app a sidecar started: ended by PID too if the sidecar could not end it."""
        pid = self.popen.pid
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                text = Path(f"/proc/{pid}/task/{task}/children").read_text()
                self.grandchildren.update(int(child) for child in text.split())
        except OSError:
            pass

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class TrafficStats:
    requests: int = 0
    failures: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, ok: bool) -> None:
        with self.lock:
            self.requests += 1
            self.failures += not ok


class Demo:
    def __init__(
        self, out: TextIO, duration: float | None, shift: bool, keep: bool = False
    ) -> None:
        self.out = out
        self.tty = out.isatty()
        self.duration = duration
        self.shift = shift
        self.keep = keep
        self.workdir = Path(tempfile.mkdtemp(prefix="meshctl-demo-"))
        self.children: list[Child] = []
        self.plane: Child | None = None
        self.client: Client | None = None
        self.api = ""
        self.stop_traffic = threading.Event()
        self.traffic = TrafficStats()
        self.threads: list[threading.Thread] = []
        self.totals: dict[str, VersionCount] = {}
        self._last_status: object = None
        self.dashboard: Dashboard | None = None

    # -- output ---------------------------------------------------------------------------

    def say(self, line: str) -> None:
        if self.tty:
            self.out.write("\r\033[K")
        self.out.write(line + "\n")
        self.out.flush()

    def status(self, line: str, key: object = None) -> None:
        """A progress line: redrawn in place on a terminal; elsewhere (a log, a pipe) printed
        only when `key` (default: the line) changes, so a wait does not flood it."""
        if self.tty:
            self.out.write("\r\033[K" + line)
            self.out.flush()
        elif (line if key is None else key) != self._last_status:
            self._last_status = line if key is None else key
            self.say(line)

    # -- starting ---------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> Child:
        log_path = self.workdir / f"{name}.log"
        with open(log_path, "wb") as log:
            # Own session: a Ctrl-C on the terminal reaches only the demo, which then stops
            # everything in order (traffic, sidecars with their apps, the control plane).
            popen = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True,
            )  # fmt: skip
        child = Child(name, popen, log_path)
        self.children.append(child)
        return child

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "no_proxy")}
        env["XDG_DATA_HOME"] = str(self.workdir / "data")
        return env

    def start_control_plane(self) -> None:
        self.status("starting the control plane (SQLite store in a temp dir)...")
        store = self.workdir / "store.db"
        token_file = self.workdir / "api-token"
        self.plane = self._spawn(
            "control-plane",
            [sys.executable, "-m", "meshctl", "serve", "--store", f"sqlite://{store}",
             "--api-port", "0", "--xds-port", "0", "--token-file", str(token_file)],
            self._env(),
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            found = re.search(r"ready: API on http://([\d.]+:\d+)", self.plane.tail(50))
            if found:
                self.api = found.group(1)
                host, port = self.api.rsplit(":", 1)
                self.client = Client((host, int(port)), token_file.read_text().strip())
                self.say(f"control plane ready: API on {self.api}, store {store}")
                return
            self.check_children()
            time.sleep(0.05)
        raise DemoFailed(
            f"the control plane is not ready after 30s; the last lines of {self.plane.log_path}:\n"
            f"{_indent(self.plane.tail())}"
        )

    def _sidecar(
        self, service: str, version: str | None, app: list[str] | None, app_port: int | None
    ) -> Child:
        assert self.client is not None
        outbound = _free_port()
        argv = [sys.executable, "-m", "meshctl", "run", "--service", service,
                "--control-plane", self.api, "--token", self.client.token,
                "--outbound-port", str(outbound), "--admin-port", "0", "--lease", str(LEASE_SECONDS),
                "--drain-timeout", "1"]  # fmt: skip
        if version:
            argv += ["--version", version]
        if app_port is not None:
            argv += ["--app-port", str(app_port), "--inbound-port", str(_free_port()),
                     "--service-port", str(SERVICE_PORT)]  # fmt: skip
        if app:
            argv += ["--", *app]
        name = f"{service}-{version}" if version else service
        child = self._spawn(name, argv, self._env())
        child.outbound_port = outbound
        return child

    def start_services(self) -> Child:
        """Every instance behind its sidecar, and a traffic client's sidecar; waits until all
        are ready and productpage answers through the mesh. Returns the client's sidecar."""
        for service, version in INSTANCES:
            port = _free_port()
            app = [
                sys.executable,
                "-m",
                "meshctl.demo.apps",
                service,
                "--port",
                str(port),
                "--version",
                version,
            ]
            self._sidecar(service, version, app, port)
        client = self._sidecar("traffic", None, None, None)
        wanted = {f"{s}-{v}" for s, v in INSTANCES}
        deadline = time.monotonic() + STARTUP_TIMEOUT
        started = time.monotonic()
        while True:
            self.check_children()
            ready = self._ready_instances()
            traffic_in = "traffic" in {s["service"] for s in self._registered()}
            self.status(
                f"starting {len(INSTANCES)} services, each behind its sidecar, and a traffic client: "
                f"{len(ready & wanted)}/{len(wanted)} ready ({time.monotonic() - started:.0f}s)",
                key=len(ready & wanted),
            )
            if ready >= wanted and traffic_in and self._request(client.outbound_port)[0]:
                break
            if time.monotonic() > deadline:
                missing = ", ".join(sorted(wanted - ready)) or "productpage through the mesh"
                raise DemoFailed(
                    f"not ready after {STARTUP_TIMEOUT:.0f}s: {missing}; logs in {self.workdir}"
                )
            time.sleep(0.3)
        for child in self.children:
            child.note_grandchildren()
        self.say(
            f"mesh up in {time.monotonic() - started:.1f}s: "
            + ", ".join(f"{s} {v}" for s, v in INSTANCES)
            + f" (+ a traffic client): {len(self.children) - 1} sidecars, {len(INSTANCES)} apps, "
            f"1 control plane; logs in {self.workdir}"
        )
        return client

    def check_children(self) -> None:
        """Raise DemoFailed naming the first process of the mesh that exited, with its log's
        last lines: a dead sidecar or control plane must stop the demo, not fail it silently."""
        for child in self.children:
            if not child.alive():
                raise DemoFailed(
                    f"{child.name} exited with status {child.popen.returncode}; the last lines of "
                    f"{child.log_path}:\n{_indent(child.tail())}"
                )

    def _registered(self) -> list[dict]:
        assert self.client is not None
        try:
            return self.client.sidecars()["items"]
        except ClientError:
            return []

    def _ready_instances(self) -> set[str]:
        return {f"{s['service']}-{s['version']}" for s in self._registered() if s.get("ready")}

    # -- traffic ----------------------------------------------------------------------------

    @staticmethod
    def _request(proxy_port: int | None, connection: list | None = None) -> tuple[bool, str]:
        """GET http://productpage:9080/ through the traffic client's sidecar (HTTP proxy mode)."""
        assert proxy_port is not None
        holder = connection if connection is not None else [None]
        try:
            if holder[0] is None:
                holder[0] = http.client.HTTPConnection("127.0.0.1", proxy_port, timeout=5)
            conn = holder[0]
            conn.request(
                "GET",
                f"http://productpage:{SERVICE_PORT}/",
                headers={"Host": f"productpage:{SERVICE_PORT}"},
            )
            response = conn.getresponse()
            body = response.read()
            if response.getheader("connection", "").lower() == "close":
                conn.close()
                holder[0] = None
            return response.status == 200, body.decode("utf-8", "replace")
        except (OSError, http.client.HTTPException) as error:
            if holder[0] is not None:
                holder[0].close()
                holder[0] = None
            return False, str(error)
        finally:
            if connection is None and holder[0] is not None:
                holder[0].close()

    def start_traffic(self, proxy_port: int) -> None:
        def loop() -> None:
            connection: list = [None]
            while not self.stop_traffic.is_set():
                ok, _ = self._request(proxy_port, connection)
                self.traffic.add(ok)
                self.stop_traffic.wait(TRAFFIC_PAUSE if ok else 0.2)
            if connection[0] is not None:
                connection[0].close()

        for number in range(TRAFFIC_THREADS):
            thread = threading.Thread(target=loop, name=f"traffic-{number}", daemon=True)
            thread.start()
            self.threads.append(thread)

    def start_dashboard(self) -> None:
        """The web dashboard of this mesh, on Kiali's port if it is free, else on any."""
        from meshctl.cli.dashboard import DEFAULT_PORT
        from meshctl.dashboard.server import Dashboard

        client = self.client
        assert client is not None
        try:
            self.dashboard = Dashboard(lambda: client.sidecars()["items"], "127.0.0.1", DEFAULT_PORT).start()
        except OSError:  # taken (another demo, a Kiali port-forward): any free port does
            self.dashboard = Dashboard(lambda: client.sidecars()["items"], "127.0.0.1", 0).start()
        self.say(f"dashboard: {self.dashboard.url} (the services, the calls between them, splits, errors)")

    # -- routing and the live view ----------------------------------------------------------

    def set_weights(self, weights: dict[str, int]) -> None:
        assert self.client is not None
        routing = read_routing(self.client, "reviews", "default")
        apply_plan(self.client, plan(routing, weights))

    def watch(self, seconds: float, label: str, deadline_check: Callable[[], bool]) -> None:
        """Refresh the live split of reviews requests every second for `seconds`."""
        assert self.client is not None
        host = service_host("reviews", "default")
        sidecars = self._registered()
        previous: Scrape = scrape(sidecars)
        end = time.monotonic() + seconds
        while time.monotonic() < end and not deadline_check():
            time.sleep(min(1.0, max(0.05, end - time.monotonic())))
            self.check_children()
            current = scrape(sidecars)
            split = split_between(previous, current, host)
            window = max(current.at - previous.at, 1e-6)
            previous = current
            for subset, count in split.items():
                total = self.totals.setdefault(subset, VersionCount())
                total.requests += count.requests
                total.errors += count.errors
            self.status(
                f"{label} | live: {self._bar(split)} | {sum(c.requests for c in split.values()) / window:.0f} rq/s"
            )
        if self.tty:
            self.out.write("\n")

    @staticmethod
    def _bar(split: dict[str, VersionCount]) -> str:
        total = sum(count.requests for count in split.values())
        if not total:
            return "no requests yet"
        parts = []
        for version in ("v1", "v2", "v3"):
            share = split.get(version, VersionCount()).requests / total
            parts.append(f"{version} {share:>4.0%} {'█' * round(share * 10):<10}")
        return " ".join(parts)

    # -- the whole run ----------------------------------------------------------------------

    def run(self) -> int:
        started = time.monotonic()
        self.start_control_plane()
        client = self.start_services()
        phases = list(SHIFT_PHASES) if self.shift else [EVEN_SPLIT]
        if self.duration is not None:
            remaining = self.duration - (time.monotonic() - started)
            phase_seconds = max(1.0, remaining / len(phases))
        else:
            phase_seconds = DEFAULT_PHASE_SECONDS
        self.start_dashboard()
        self.start_traffic(client.outbound_port or 0)
        self.say(
            "traffic: GET http://productpage:9080/ through the traffic client's sidecar; "
            "the split is what productpage's sidecar reports for reviews"
            + ("" if self.duration is not None else "; Ctrl-C stops everything")
        )
        end = None if self.duration is None else started + self.duration
        for number, weights in enumerate(phases, 1):
            self.set_weights(weights)
            label = f"weights {describe_weights(weights)}"
            what = f"step {number}/{len(phases)}" if self.shift else "no shift"
            self.say(
                f"[{time.monotonic() - started:5.1f}s] {what}: reviews → {describe_weights(weights)}"
            )
            self.watch(phase_seconds, label, lambda: False)
        if end is None:
            # Past the last phase: keep the final weights and the live view until Ctrl-C.
            while True:
                self.watch(3600, "final weights", lambda: False)
        if self.traffic.requests == self.traffic.failures:
            raise DemoFailed(
                f"no productpage request succeeded ({self.traffic.requests} sent); "
                f"logs in {self.workdir}"
            )
        return 0

    def summary(self) -> None:
        self.totals = {v: c for v, c in self.totals.items() if v and c.requests}
        total = sum(count.requests for count in self.totals.values())
        if not self.traffic.requests:
            self.say("traffic: none sent (the mesh did not come up)")
            return
        self.say(
            f"traffic: {self.traffic.requests} productpage requests, {self.traffic.failures} failed"
        )
        if total:
            shares = ", ".join(
                f"{version} {self.totals[version].requests} ({self.totals[version].requests / total:.0%})"
                for version in sorted(self.totals)
            )
            self.say(f"reviews requests by version over the run: {shares}")

    def stop(self) -> None:
        """End everything this demo started, by PID: traffic, sidecars (they stop their apps),
        any app a sidecar left behind, then the control plane."""
        self.stop_traffic.set()
        for thread in self.threads:
            thread.join(timeout=6)
        if self.dashboard is not None:
            self.dashboard.close()
        sidecars = [child for child in self.children if child is not self.plane]
        for child in sidecars:
            child.note_grandchildren()
        self.status(f"stopping {len(sidecars)} sidecars and their apps...")
        for child in sidecars:
            if child.alive():
                child.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for child in sidecars:
            try:
                child.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.popen.kill()
                child.popen.wait()
        for child in sidecars:
            for pid in child.grandchildren:
                _kill_if_ours(pid)
        if self.plane is not None and self.plane.alive():
            self.plane.popen.send_signal(signal.SIGTERM)
            try:
                self.plane.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.plane.popen.kill()
                self.plane.popen.wait()
        self.say(
            f"stopped every process the demo started ({len(self.children)} children and their apps)"
            + (f"; logs kept in {self.workdir}" if self.keep else "")
        )
        if not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _indent(text: str) -> str:
    return "\n".join("  | " + line for line in text.splitlines()) or "  | (empty)"


def _kill_if_ours(pid: int) -> None:
    """SIGKILL a demo app a sidecar left behind, if that PID still is one (not a reused PID)."""
    try:
        if b"meshctl.demo.apps" in Path(f"/proc/{pid}/cmdline").read_bytes():
            os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def run_demo(out: TextIO, duration: float | None, shift: bool, keep: bool = False) -> int:
    demo = Demo(out, duration, shift, keep)

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate)
    status = 0
    try:
        status = demo.run()
    except KeyboardInterrupt:
        demo.say("interrupted; stopping")
    except (DemoFailed, ClientError) as error:
        demo.say(f"meshctl demo: {getattr(error, 'message', error)}")
        demo.keep = True  # the logs explain it
        status = 1
    finally:
        # A second Ctrl-C must not cut the clean-up short and leave processes behind.
        previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            demo.summary()
            demo.stop()
        finally:
            signal.signal(signal.SIGTERM, previous)
            signal.signal(signal.SIGINT, previous_int)
    return status
