"""Mesh sidecars (`meshctl run --service`) for scale and failover tests: start, count, read stats."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from .control_plane import ControlPlane
from .etcd_cluster import EtcdCluster
from .ports import free_port

SERVERS = Path(__file__).resolve().parent.parent / "servers"


class MeshSidecar:
    """One `meshctl run --service` process (and the app it guards), signalled by its own PID only."""

    def __init__(self, env: dict[str, str], directory: Path, service: str, *args: str,
                 command: list[str] = (), lease: float = 3.0, under: list[str] = (),
                 outbound_port: int | None = None) -> None:  # fmt: skip
        """`under`: a command the sidecar runs under (a benchmark's valgrind), the PID still its own."""
        self.service = service
        # Given when the app must know it before the sidecar starts (to call other services).
        self.outbound_port = outbound_port or free_port()
        self.admin_port = free_port()
        self.log_path = directory / f"{service}-{self.outbound_port}.log"
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(
                [*under, sys.executable, "-m", "meshctl", "run", "--service", service,
                 "--outbound-port", str(self.outbound_port), "--admin-port", str(self.admin_port),
                 "--lease", str(lease), *args, *(["--", *command] if command else [])],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            )  # fmt: skip

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def children(self) -> list[int]:
        """PIDs of this sidecar's child processes, whichever of its threads started them."""
        pids: list[int] = []
        for task in Path(f"/proc/{self.popen.pid}/task").glob("*"):
            try:
                pids.extend(int(pid) for pid in (task / "children").read_text().split())
            except OSError:
                continue
        return pids

    def upstream_requests(self) -> Counter:
        """meshctl_upstream_rq_total per cluster, from this sidecar's own admin endpoint."""
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.admin_port}/stats/prometheus", timeout=3
        ) as response:
            text = response.read().decode()
        counts: Counter = Counter()
        for found in re.finditer(r'^meshctl_upstream_rq_total\{cluster="([^"]+)"\} (\d+)', text, re.MULTILINE):
            counts[found.group(1)] = int(found.group(2))
        return counts

    def stop(self, sig: int = signal.SIGTERM) -> None:
        apps = self.children()
        if self.popen.poll() is None:
            self.popen.send_signal(sig)  # this PID only
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        for pid in apps:  # only if its sidecar did not take it down
            kill_echo(pid)


def stop_all(sidecars: list[MeshSidecar], *planes: ControlPlane) -> None:
    """Stop every sidecar (and the app it guards), then every control plane."""
    for sidecar in sidecars:
        sidecar.stop()
    for plane in planes:
        plane.stop()


def kill_echo(pid: int) -> None:
    """SIGKILL `pid` if it is still one of the echo apps tests start (not a reused PID)."""
    try:
        if any(app in Path(f"/proc/{pid}/cmdline").read_bytes() for app in (b"http_echo.py", b"trace_app.py")):
            os.kill(pid, signal.SIGKILL)
    except (OSError, ProcessLookupError):
        pass


def echo_instance(env: dict[str, str], directory: Path, service: str, version: str,
                  service_port: int = 9080, lease: float = 3.0) -> MeshSidecar:  # fmt: skip
    """An instance of `service` whose app is tests/servers/http_echo.py answering with its version."""
    app_port = free_port()
    return MeshSidecar(
        env, directory, service, "--version", version, "--app-port", str(app_port),
        "--service-port", str(service_port), "--inbound-port", str(free_port()),
        command=[sys.executable, str(SERVERS / "http_echo.py"), "--name", version, "--port", str(app_port)],
        lease=lease,
    )  # fmt: skip


def ask_host(port: int, host: str = "reviews:9080", headers: dict[str, str] | None = None) -> str:
    """One request to a sidecar's outbound listener, routed by Host; the answering app's name."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/", headers={"Host": host, **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=3) as response:
            return json.loads(response.read())["name"]
    except urllib.error.HTTPError as error:
        return f"HTTP {error.code}"
    except OSError as error:
        return f"error: {type(error).__name__}"


def wait_until(check: Callable[[], object], timeout: float, what: str, step: float = 0.05) -> float:
    started = time.monotonic()
    last = None
    while time.monotonic() - started < timeout:
        last = check()
        if last is True:
            return time.monotonic() - started
        time.sleep(step)
    raise AssertionError(f"{what}: not within {timeout}s (last: {last})")


def registered(plane: ControlPlane | str, token: str | None = None) -> list[dict]:
    address = plane if isinstance(plane, str) else plane.address
    token = token or plane.token_path.read_text().strip()
    request = urllib.request.Request(
        f"http://{address}/v1/sidecars", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=3) as response:
        return json.loads(response.read())["items"]


def subsets_of(counts: Counter, host_prefix: str = "reviews") -> Counter:
    """{"v1": n, ...} from per-cluster counts named outbound|PORT|SUBSET|HOST."""
    out: Counter = Counter()
    for cluster, count in counts.items():
        parts = cluster.split("|")
        if len(parts) == 4 and parts[0] == "outbound" and parts[3].startswith(host_prefix):
            out[parts[2] or "(all)"] += count
    return out


def destination_rule(*subsets: str) -> str:
    """A DestinationRule for reviews with one subset per version label, named after it."""
    return (
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews}\n"
        "spec:\n  host: reviews\n  subsets:\n"
        + "".join(f"  - {{name: {name}, labels: {{version: {name}}}}}\n" for name in subsets)
    )


def virtual_service(v1: int, v2: int, jason: str | None = None) -> str:
    """A VirtualService splitting reviews v1/v2 by weight; first, if `jason`, end-user jason to that subset."""
    match = (
        "  - match:\n    - headers: {end-user: {exact: jason}}\n"
        f"    route:\n    - destination: {{host: reviews, subset: {jason}}}\n"
    ) if jason else ""  # fmt: skip
    return (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews}\n"
        f"spec:\n  hosts: [reviews]\n  http:\n{match}"
        f"  - route:\n    - destination: {{host: reviews, subset: v1}}\n      weight: {v1}\n"
        f"    - destination: {{host: reviews, subset: v2}}\n      weight: {v2}\n"
    )


def rules(v1: int, v2: int, jason: str | None = None) -> str:
    """Subsets v1 and v2 of reviews and a VirtualService splitting it between them (see virtual_service)."""
    return destination_rule("v1", "v2") + "---\n" + virtual_service(v1, v2, jason)


def apply(plane: ControlPlane, text: str) -> None:
    """`meshctl apply -f -` of `text` through `plane`; it must succeed."""
    done = plane.meshctl("apply", "-f", "-", stdin=text)
    assert done.returncode == 0, done.stderr


class Load(threading.Thread):
    """Requests for reviews:9080 through one client sidecar, back to back, until stopped."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.answers: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            self.answers.append(ask_host(self.port))
            time.sleep(0.005)

    def last(self, count: int) -> list[str]:
        return self.answers[-count:]

    def failures(self) -> Counter:
        return Counter(a for a in self.answers if a not in ("v1", "v2"))


def moved_to(load: Load, name: str, count: int = 10):
    return lambda: load.last(count) == [name] * count or Counter(load.last(count))


def start_loads(clients: dict[str, MeshSidecar], loads: dict[str, Load], label: str) -> None:
    """Once each client reaches reviews v1, a Load through it (into `loads`), flowing; `label % name` names it."""
    for name, client in clients.items():
        wait_until(lambda client=client: ask_host(client.outbound_port) == "v1", 15, f"{label % name} → v1")
        loads[name] = Load(client.outbound_port)
        loads[name].start()
    for name, load in loads.items():
        wait_until(moved_to(load, "v1"), 5, f"load through {label % name}")


def kill_leader_and_plane(cluster: EtcdCluster, plane: ControlPlane) -> int:
    """SIGKILL the etcd leader and `plane` (their own PIDs); the leader's member index."""
    leader = cluster.leader()
    cluster.members[leader].kill()
    plane.popen.kill()
    plane.popen.wait()
    return leader


def finish_loads(loads: dict[str, Load], label: str) -> None:
    """Stop every Load, print its tally, and assert that none of its requests failed."""
    for load in loads.values():
        load.halt.set()
        load.join(5)
    for name, load in loads.items():
        print(f"{label % name}: {len(load.answers)} requests, {Counter(load.answers)}")
        assert load.failures() == Counter(), (name, load.failures())


def print_logs(sidecars: list[MeshSidecar], planes: dict[str, ControlPlane], cluster: EtcdCluster | None = None,
               sidecar_tail: int = 1500, plane_tail: int = 3000) -> None:  # fmt: skip
    """The tails of the sidecars', planes' (and etcd's) logs, for a failed test."""
    for sidecar in sidecars:
        print(f"--- {sidecar.log_path.name} ---\n{sidecar.log()[-sidecar_tail:]}")
    for name, plane in planes.items():
        print(f"--- meshctl serve{name and ' ' + name} ---\n{plane.log()[-plane_tail:]}")
    if cluster is not None:
        print(cluster.logs()[-3000:])
