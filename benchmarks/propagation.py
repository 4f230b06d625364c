"""Propagation benchmark (outside CI): time from `meshctl route set` returning to every sidecar
routing by the new weights, for 10, 50 and 100 sidecars and with 1,000 routes in the mesh, and
the control plane's RSS.

    python -m benchmarks.propagation [--sidecars 10,50,100] [--routes 1000] [--rounds 20]

How it runs: one real `meshctl serve` (SQLite store in a temp dir) and two echo apps registered
as reviews v1 and v2. Sidecars are real engines (meshctl._core.Engine) each fed by its own
AdsClient and registered through the API like `meshctl run --service` does (the agent's own
classes), but several share a worker process (--per-process, 25 by default) so that 100 of
them fit on a small machine: same ADS streams, same engine, only fewer Python interpreters.

What is timed: each round flips reviews between v1=100,v2=0 and v1=0,v2=100 with
`meshctl route set`. A sidecar routes by the new weights from the moment its engine's apply()
of the new RouteConfiguration returns (the swap is atomic); each worker stamps that moment
(wall clock, same host), and a sidecar's propagation time is that stamp minus the moment
`meshctl route set` returned (0 if it was earlier). After the last round of every phase, one
request through every sidecar's outbound listener checks that it answers from the new version.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ECHO = ROOT / "tests" / "servers" / "http_echo.py"
ROUTE_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- worker: several sidecars in one process -----------------------------------------------


class _StampedEngine:
    """An engine whose RouteConfiguration swaps are stamped (and reported) as they complete."""

    def __init__(self, engine, node_id: str, lock: threading.Lock) -> None:
        self._engine, self._node_id, self._lock = engine, node_id, lock

    def apply(self, type_url: str, resources) -> None:
        self._engine.apply(type_url, resources)
        if type_url == ROUTE_TYPE:
            stamp = time.time()
            with self._lock:
                print(f"route {self._node_id} {stamp:.6f}", flush=True)

    def remove(self, type_url: str, names) -> None:
        self._engine.remove(type_url, names)

    def __getattr__(self, name: str):
        return getattr(self._engine, name)  # everything else as the engine itself


def worker(api: str, token: str, xds: str, prefix: str, count: int) -> None:
    import trio

    from meshctl import _core
    from meshctl.agent.bootstrap import bootstrap_from_dict
    from meshctl.agent.mesh_agent import Agent, AgentOptions

    xds_host, xds_port = xds.rsplit(":", 1)
    lock = threading.Lock()
    engines = []

    async def one(index: int, nursery) -> None:
        node_id = f"bench-{prefix}-{index}"
        outbound = free_port()
        engine = _core.Engine(bootstrap_from_dict({}), worker_threads=1)
        engines.append(engine)
        stamped = _StampedEngine(engine, node_id, lock)
        # As `meshctl run --service` does: a certificate (API token: an operator's), then
        # registration and ADS over the plane's TLS port.
        xds_address = (xds_host, int(xds_port))
        options = AgentOptions(service="productpage", control_plane=xds_address, token=token,
                               outbound_port=outbound, lease_seconds=3600.0, node_id=node_id)  # fmt: skip
        agent = Agent(options, stamped)
        await agent.obtain_identity()
        await agent.register_until_accepted()
        await nursery.start(agent.new_ads_client().run)
        while "virtualOutbound" not in engine.listener_addresses():
            await trio.sleep(0.02)
        with lock:
            print(f"ready {node_id} {outbound}", flush=True)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for index in range(count):
                await one(index, nursery)
            # Until the parent closes our stdin.
            await trio.to_thread.run_sync(sys.stdin.read)
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        for engine in engines:
            engine.stop()


# --- the parent -------------------------------------------------------------------------------


class Bench:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.env = {**os.environ, "XDG_DATA_HOME": str(directory / "data"), "PYTHONPATH": str(ROOT)}
        self.processes: list[subprocess.Popen] = []
        self.stamps: dict[str, list[float]] = defaultdict(list)
        self.ready: dict[str, int] = {}
        self.lock = threading.Lock()
        with open(directory / "serve.log", "wb") as log:
            self.plane = subprocess.Popen(
                [sys.executable, "-m", "meshctl", "serve", "--api-port", "0", "--xds-port", "0",
                 "--store", f"sqlite:///{directory / 'store.db'}"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            text = (directory / "serve.log").read_text(errors="replace")
            api = re.search(r"API on http://([\d.]+:\d+)", text)
            xds = re.search(r"xDS on ([\d.]+:\d+)", text) or re.search(r"ADS[^\n]*?([\d.]+:\d+)", text)
            if api and xds:
                self.api, self.xds = api.group(1), xds.group(1)
                break
            if self.plane.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"meshctl serve did not start:\n{text}")
            time.sleep(0.05)
        self.env["MESHCTL_CONTROL_PLANE"] = self.api
        self.token = (directory / "data" / "meshctl" / "api-token").read_text().strip()
        self.workers = 0

    def meshctl(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "meshctl", *args], input=stdin, capture_output=True,
                              text=True, env=self.env, timeout=120, check=False)  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"meshctl {' '.join(args)}: {done.stderr}")
        return done

    def register(self, node_id: str, **fields) -> None:
        request = urllib.request.Request(
            f"http://{self.api}/v1/sidecars/{node_id}", data=json.dumps(fields).encode(), method="PUT",
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=10):
            pass

    def start_upstreams(self) -> None:
        for version in ("v1", "v2"):
            port = free_port()
            self.processes.append(subprocess.Popen(
                [sys.executable, str(ECHO), "--name", version, "--port", str(port)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
            ))  # fmt: skip
            # An instance without a sidecar: its endpoint is the app port itself.
            self.register(f"reviews-{version}", service="reviews", version=version, appPort=port,
                          servicePort=9080, ready=True, leaseSeconds=3600)  # fmt: skip

    def add_sidecars(self, total: int, per_process: int) -> None:
        while len(self.ready) < total:
            count = min(per_process, total - len(self.ready) - self._pending())
            if count <= 0:
                time.sleep(0.05)
                continue
            prefix = f"w{self.workers}"
            self.workers += 1
            with open(self.directory / f"{prefix}.log", "wb") as log:
                process = subprocess.Popen(
                    [sys.executable, "-m", "benchmarks.propagation", "--worker", self.api, self.token, self.xds, prefix, str(count)],
                    stdout=subprocess.PIPE, stdin=subprocess.PIPE, stderr=log, text=True, env=self.env, cwd=ROOT,
                )  # fmt: skip
            process.expected = count  # type: ignore[attr-defined]
            self.processes.append(process)
            threading.Thread(target=self._read, args=(process,), daemon=True).start()
        deadline = time.monotonic() + 120
        while len(self.ready) < total:
            dead = [p.args[-2] for p in self.processes if getattr(p, "expected", 0) and p.poll() is not None]
            if dead:
                log = (self.directory / f"{dead[0]}.log").read_text()[-3000:]
                raise RuntimeError(f"worker {dead[0]} exited:\n{log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(self.ready)} of {total} sidecars got their config")
            time.sleep(0.05)

    def _pending(self) -> int:
        started = sum(getattr(p, "expected", 0) for p in self.processes)
        return started - len(self.ready)

    def _read(self, process: subprocess.Popen) -> None:
        for line in process.stdout:
            parts = line.split()
            with self.lock:
                if parts[:1] == ["ready"]:
                    self.ready[parts[1]] = int(parts[2])
                elif parts[:1] == ["route"]:
                    self.stamps[parts[1]].append(float(parts[2]))

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.plane.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def apply_api(self, weights: str) -> None:
        """What `meshctl apply -f` sends (POST /v1/apply): reviews' DestinationRule and
        VirtualService with these weights."""
        v1, v2 = (int(part.split("=")[1]) for part in weights.split(","))
        docs = [
            {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"name": "reviews"},
             "spec": {"host": "reviews", "subsets": [{"name": v, "labels": {"version": v}} for v in ("v1", "v2")]}},
            {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": "reviews"},
             "spec": {"hosts": ["reviews"], "http": [{"route": [
                 {"destination": {"host": "reviews", "subset": "v1"}, "weight": v1},
                 {"destination": {"host": "reviews", "subset": "v2"}, "weight": v2}]}]}},
        ]  # fmt: skip
        request = urllib.request.Request(
            f"http://{self.api}/v1/apply", data="\n---\n".join(json.dumps(d) for d in docs).encode(), method="POST",
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/yaml"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()

    def route_set(self, weights: str) -> None:
        self.meshctl("route", "set", "reviews", "--weights", weights)

    def round(self, weights: str, change=None, timeout: float = 30.0) -> list[float]:
        """One change (`meshctl route set` by default); each sidecar's propagation time in
        seconds from the change returning."""
        with self.lock:
            seen = {node: len(stamps) for node, stamps in self.stamps.items()}
        started = time.time()
        (change or self.route_set)(weights)
        returned = time.time()
        self.change_seconds.append(returned - started)
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                fresh = {node: stamps[seen.get(node, 0)] for node, stamps in self.stamps.items()
                         if node in self.ready and len(stamps) > seen.get(node, 0)}  # fmt: skip
            if len(fresh) == len(self.ready):
                return [max(0.0, stamp - returned) for stamp in fresh.values()]
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(self.ready) - len(fresh)} sidecars did not get {weights} in {timeout}s")
            time.sleep(0.002)

    current = "v1"
    change_seconds: list[float] = []  # noqa: RUF012 (reset per phase)

    def settle(self, quiet: float = 2.0, timeout: float = 120.0) -> None:
        """Wait until no sidecar has applied a route for `quiet` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                before = sum(len(s) for s in self.stamps.values())
            time.sleep(quiet)
            with self.lock:
                if sum(len(s) for s in self.stamps.values()) == before:
                    return
        raise RuntimeError(f"sidecars still applying routes after {timeout}s")

    def flip(self, change=None) -> list[float]:
        """Send everything to the other version; each sidecar's propagation time."""
        self.current = "v2" if self.current == "v1" else "v1"
        return self.round("v1=100,v2=0" if self.current == "v1" else "v1=0,v2=100", change)

    def check_routing(self, expected: str) -> None:
        wrong = {}
        for node, port in self.ready.items():
            request = urllib.request.Request(f"http://127.0.0.1:{port}/", headers={"Host": "reviews:9080"})
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    name = json.loads(response.read())["name"]
            except (urllib.error.URLError, OSError, ValueError) as error:
                name = f"error {error}"
            if name != expected:
                wrong[node] = name
        if wrong:
            raise RuntimeError(f"sidecars not routing to {expected}: {dict(list(wrong.items())[:5])}")

    def add_routes(self, count: int) -> None:
        """`count` VirtualServices (svc-N → its own host), applied in batches."""
        for start in range(0, count, 100):
            docs = [
                {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": f"svc-{i}"},
                 "spec": {"hosts": [f"svc-{i}"], "http": [{"route": [{"destination": {"host": f"svc-{i}"}}]}]}}
                for i in range(start, min(count, start + 100))
            ]  # fmt: skip
            self.meshctl("apply", "-f", "-", stdin="\n---\n".join(json.dumps(doc) for doc in docs))

    def close(self) -> None:
        for process in self.processes:
            if process.stdin:
                process.stdin.close()  # workers end when their stdin closes
        for process in [*self.processes, self.plane]:
            if process.poll() is None:
                if process.stdin is None:
                    process.terminate()  # this PID
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered) + 0.5) - 1))]


def phase(bench: Bench, label: str, rounds: int) -> list[dict]:
    rows = []
    for how, change in (("meshctl route set", bench.route_set), ("POST /v1/apply", bench.apply_api)):
        per_sidecar: list[float] = []
        every: list[float] = []
        bench.change_seconds = []
        for _ in range(rounds):
            times = bench.flip(change)
            per_sidecar += times
            every.append(max(times))
        bench.check_routing(bench.current)
        ms = 1000.0
        rows.append({
            "config": label, "how": how, "sidecars": len(bench.ready), "rounds": rounds,
            "p50": statistics.median(per_sidecar) * ms, "p99": percentile(per_sidecar, 0.99) * ms,
            "all_p50": statistics.median(every) * ms, "all_p99": percentile(every, 0.99) * ms,
            "all_max": max(every) * ms, "rss": bench.rss_mib(),
            "change": statistics.median(bench.change_seconds) * ms,
        })  # fmt: skip
        print(rows[-1], file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sidecars", default="10,50,100")
    parser.add_argument("--routes", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--per-process", type=int, default=25)
    parser.add_argument("--worker", nargs=5, metavar=("API", "TOKEN", "XDS", "PREFIX", "COUNT"))
    args = parser.parse_args()
    if args.worker:
        api, token, xds, prefix, count = args.worker
        worker(api, token, xds, prefix, int(count))
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="meshctl-propagation-") as directory:
        bench = Bench(Path(directory))
        try:
            bench.start_upstreams()
            bench.meshctl("route", "set", "reviews", "--weights", "v1=100,v2=0")
            counts = [int(n) for n in args.sidecars.split(",")]
            for count in counts:
                started = time.monotonic()
                bench.add_sidecars(count, args.per_process)
                print(f"{count} sidecars connected in {time.monotonic() - started:.1f}s", file=sys.stderr)
                bench.flip()  # warm-up: the new sidecars have the subsets' clusters
                rows += phase(bench, "reviews v1/v2", args.rounds)
            if args.routes:
                started = time.monotonic()
                bench.add_routes(args.routes)
                print(f"{args.routes} routes applied in {time.monotonic() - started:.1f}s", file=sys.stderr)
                bench.settle()  # every sidecar has taken the big config before timing starts
                rows += phase(bench, f"reviews v1/v2 + {args.routes} routes", args.rounds)
        finally:
            bench.close()
    print()
    print("| config | change by | change took p50 ms | sidecars | rounds | per sidecar p50 ms | p99 ms | all sidecars p50 ms | p99 ms | max ms | plane RSS MiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['config']} | {r['how']} | {r['change']:.0f} | {r['sidecars']} | {r['rounds']} | {r['p50']:.0f} | {r['p99']:.0f} | "
              f"{r['all_p50']:.0f} | {r['all_p99']:.0f} | {r['all_max']:.0f} | {r['rss']:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
