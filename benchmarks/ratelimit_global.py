"""Issue 10's global limit budget: what one global RateLimit that never triggers adds to the p99 of
10 client sidecars at 2,000 req/s each, meshctl (batched quota) against Envoy (one call to the rate
limit service per request), both served by the same `meshctl serve`.

    python -m benchmarks.ratelimit_global [--sidecars 10] [--qps 2000] [--seconds 10] [--rounds 3]

The mesh is the one the tests build (tests/helpers): a real `meshctl serve`; `reviews` registered
as an instance whose app is the benchmark's nginx upstream; client sidecars that reach it directly
(no server sidecar): `meshctl run --token` over ADS, or Envoy 1.40 running the plane's compiled
config from a file with the workload certificate `meshctl identity agent` wrote. Per round, each
data plane is measured without a RateLimit (`plain`) and with a global rule of 10^9 requests a
minute (`limited`): every sidecar under fortio at QPS for SECONDS at once. Figures: the median over
sidecars of each one's p50/p99, then the median over rounds; `added` is limited minus plain in the
same round. The budget (issue 10): meshctl's added p99 ≤ 50 µs. Raw samples and the table go to
results/ratelimit_global.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks import loadgen, peers, procfs

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))  # the mesh scaffolding the end-to-end tests use, written once there

from helpers.control_plane import ControlPlane, start_control_plane
from helpers.envoy_client_sidecar import start_client_envoy
from helpers.envoy_sidecar import register
from helpers.mesh import MeshSidecar, apply, wait_until

RESULTS = Path(__file__).resolve().parent / "results"
HOST = "reviews.default.svc.cluster.local"
SERVICE_PORT = 9080
BUDGET_US = 50.0
MESHCTL_CALLS = ("meshctl_cluster_ratelimit_ok_total", "meshctl_cluster_ratelimit_over_limit_total",
                 "meshctl_cluster_ratelimit_error_total")  # fmt: skip
MESHCTL_REFILLS = "meshctl_cluster_ratelimit_quota_refill_total"
NEVER_TRIGGERED = """
apiVersion: policy.meshctl.io/v1alpha1
kind: RateLimit
metadata: {name: reviews-global}
spec:
  host: reviews
  rules:
  - limit: {requests: 1000000000, unit: minute}
    scope: global
"""


def _admin(admin_port: int, path: str) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{admin_port}{path}", timeout=5) as response:
        return response.read().decode()


def status_through(port: int) -> int | None:
    """One request to the upstream through a sidecar: its status, None if there was no answer."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(f"http://127.0.0.1:{port}/", headers={"Host": f"{HOST}:{SERVICE_PORT}"})
    try:
        with opener.open(request, timeout=3) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


def _sum(text: str, prefix: str) -> float:
    """The sum of every series whose name starts with `prefix`."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def meshctl_calls(admin_port: int) -> float:
    text = _admin(admin_port, "/stats/prometheus")
    return sum(_sum(text, prefix) for prefix in MESHCTL_CALLS)


def meshctl_refills(admin_port: int) -> float:
    """Calls a meshctl sidecar made ahead of need, off the request path (no request waits on them)."""
    return _sum(_admin(admin_port, "/stats/prometheus"), MESHCTL_REFILLS)


def no_refills(admin_port: int) -> float:
    return 0.0  # Envoy reads no quota


def envoy_calls(admin_port: int) -> float:
    """`cluster.<route's cluster>.ratelimit.*` from /stats (Envoy's Prometheus names mangle
    cluster names that contain dots)."""
    text = _admin(admin_port, "/stats")
    return sum(int(n) for n in re.findall(r"^cluster\.[^ ]*\.ratelimit\.(?:ok|over_limit|error): (\d+)$", text, re.MULTILINE))


@dataclass
class Sidecar:
    """One client sidecar as the benchmark drives it: where to send, how to read its service calls."""

    port: int
    admin_port: int
    stop: Callable[[], None]
    calls: Callable[[int], float]  # the rate limit service calls requests waited for (admin port)
    refills: Callable[[int], float]  # calls made ahead of need, which no request waits for

    def service_calls(self) -> float:
        return self.calls(self.admin_port)

    def refill_calls(self) -> float:
        return self.refills(self.admin_port)




def start_meshctl_sidecars(plane: ControlPlane, count: int, directory: Path) -> list[Sidecar]:
    env = {k: v for k, v in plane.env.items() if k != "MESHCTL_TOKEN"}
    directory.mkdir(parents=True, exist_ok=True)
    started = []
    for number in range(count):
        service = f"client{number}"
        identity = ("--token", plane.join_token(service), "--xds-address", plane.xds_address)
        started.append(MeshSidecar(env, directory, service, *identity))
    for each in started:
        wait_until(lambda: status_through(each.outbound_port) == 200, 60, f"{each.service} reaches reviews")  # noqa: B023
    return [Sidecar(s.outbound_port, s.admin_port, s.stop, meshctl_calls, meshctl_refills) for s in started]


def start_envoy_sidecars(plane: ControlPlane, count: int, app_port: int, directory: Path) -> list[Sidecar]:
    sidecars = []
    for number in range(count):
        envoy, port = start_client_envoy(plane, f"envoy{number}", HOST, SERVICE_PORT, app_port,
                                         directory / f"envoy{number}")  # fmt: skip
        sidecars.append(Sidecar(port, envoy.extra["admin_port"], envoy.stop, envoy_calls, no_refills))
    return sidecars


def load(sidecars: list[Sidecar], qps: int, seconds: float) -> list[loadgen.LoadResult]:
    """fortio at `qps` on every sidecar at once."""
    results: list[loadgen.LoadResult | Exception] = [RuntimeError("not run")] * len(sidecars)

    def one(index: int) -> None:
        try:
            results[index] = loadgen.fortio(f"http://127.0.0.1:{sidecars[index].port}/", qps=qps, connections=16,
                                            seconds=seconds, host=f"{HOST}:{SERVICE_PORT}")  # fmt: skip
        except (loadgen.LoadFailed, OSError, ValueError, KeyError) as error:  # reported below, with the others
            results[index] = error

    threads = [threading.Thread(target=one, args=(index,)) for index in range(len(sidecars))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    failures = [result for result in results if isinstance(result, Exception)]
    if failures:
        raise loadgen.LoadFailed(f"{len(failures)} of {len(sidecars)} load runs failed: {failures[0]}")
    return results  # type: ignore[return-value]


def measure(kind: str, phase: str, sidecars: list[Sidecar], plane: ControlPlane, args: argparse.Namespace) -> dict:
    calls_before = sum(s.service_calls() for s in sidecars)
    refills_before = sum(s.refill_calls() for s in sidecars)
    plane_cpu_before = procfs.tree_cpu_seconds(plane.popen.pid)
    results = load(sidecars, args.qps, args.seconds)
    calls = sum(s.service_calls() for s in sidecars) - calls_before
    refills = sum(s.refill_calls() for s in sidecars) - refills_before
    requests = sum(r.requests for r in results)
    sample = {
        "kind": kind, "phase": phase,
        "p50_us": statistics.median(r.latency_us["p50"] for r in results),
        "p99_us": statistics.median(r.latency_us["p99"] for r in results),
        "worst_p99_us": max(r.latency_us["p99"] for r in results),
        "requests": requests, "req_per_s": sum(r.requests_per_second for r in results),
        "non_2xx": sum(r.non_2xx for r in results), "socket_errors": sum(r.socket_errors for r in results),
        "service_calls": calls, "refill_calls": refills, "plane_cpu_s": procfs.tree_cpu_seconds(plane.popen.pid) - plane_cpu_before,
    }  # fmt: skip
    print(f"  [{kind} {phase}] {sample['req_per_s']:,.0f} req/s, p50 {sample['p50_us']:.0f} µs, "
          f"p99 {sample['p99_us']:.0f} µs (worst sidecar {sample['worst_p99_us']:.0f}), non-2xx "
          f"{sample['non_2xx']}, errors {sample['socket_errors']}, requests that waited for a call {calls:,.0f} "
          f"({calls / max(requests, 1):.2%}), refills {refills:,.0f}, plane CPU {sample['plane_cpu_s']:.1f}s", flush=True)  # fmt: skip
    return sample


def set_limited(plane: ControlPlane, limited: bool) -> None:
    if limited:
        apply(plane, NEVER_TRIGGERED)
    else:
        plane.meshctl("delete", "ratelimit", "reviews-global")


def wait_for_filter(sidecars: list[Sidecar], present: bool) -> None:
    """Until a request through each sidecar calls the service (present) or does not (absent)."""
    for sidecar in sidecars:
        def settled() -> bool:
            before = sidecar.service_calls()  # noqa: B023
            status_through(sidecar.port)  # noqa: B023
            return (sidecar.service_calls() > before) == present  # noqa: B023

        wait_until(settled, 30, f"the global filter {'in' if present else 'out of'} a sidecar", step=0.3)


def run(args: argparse.Namespace, rundir: Path) -> list[dict]:
    upstream = peers.start(peers.UPSTREAM, rundir / "upstream", cpu=peers.LOADGEN_CPU)
    plane = start_control_plane(rundir / "plane")
    samples = []
    try:
        register(plane, "reviews-v1", service="reviews", version="v1", servicePort=SERVICE_PORT,
                 appPort=peers.UPSTREAM_HTTP1_PORT, ready=True)  # fmt: skip
        meshctl = start_meshctl_sidecars(plane, args.sidecars, rundir / "meshctl")
        try:
            for number in range(1, args.rounds + 1):
                print(f"round {number}/{args.rounds}", flush=True)
                for phase in ("plain", "limited"):
                    set_limited(plane, phase == "limited")
                    wait_for_filter(meshctl, phase == "limited")
                    samples.append({"round": number, **measure("meshctl", phase, meshctl, plane, args)})
                    # Envoy compiles the plane's config when it starts: fresh Envoys per phase.
                    envoys = start_envoy_sidecars(plane, args.sidecars, peers.UPSTREAM_HTTP1_PORT,
                                                  rundir / f"envoy-{number}-{phase}")  # fmt: skip
                    try:
                        samples.append({"round": number, **measure("envoy", phase, envoys, plane, args)})
                    finally:
                        for envoy in envoys:
                            envoy.stop()
        finally:
            for sidecar in meshctl:
                sidecar.stop()
    finally:
        plane.stop()
        upstream.stop()
    return samples


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def render(samples: list[dict], args: argparse.Namespace) -> str:
    lines = [
        (f"# Global rate limit, never triggered: {args.sidecars} client sidecars × {args.qps:,} req/s, "
         f"{args.seconds:g} s, {args.rounds} rounds"),
        "",
        ("| data plane | p50 plain | p50 limited | p99 plain | p99 limited | added p99 (per round) | "
         "requests that waited for a call | refill calls per request | plane CPU s (limited) | errors |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for kind in ("meshctl", "envoy"):
        plain = [s for s in samples if s["kind"] == kind and s["phase"] == "plain"]
        limited = [s for s in samples if s["kind"] == kind and s["phase"] == "limited"]
        added = [lim["p99_us"] - pl["p99_us"] for pl, lim in zip(plain, limited)]
        calls = _median([s["service_calls"] / max(s["requests"], 1) for s in limited])
        refills = _median([s.get("refill_calls", 0) / max(s["requests"], 1) for s in limited])
        errors = sum(s["non_2xx"] + s["socket_errors"] for s in plain + limited)
        lines.append(
            f"| {kind} | {_median([s['p50_us'] for s in plain]):.0f} µs | {_median([s['p50_us'] for s in limited]):.0f} µs "
            f"| {_median([s['p99_us'] for s in plain]):.0f} µs | {_median([s['p99_us'] for s in limited]):.0f} µs "
            f"| {_median(added):+.0f} µs ({', '.join(f'{a:+.0f}' for a in added)}) | {calls:.4%} | {refills:.4%} "
            f"| {_median([s['plane_cpu_s'] for s in limited]):.1f} | {errors} |"
        )  # fmt: skip
        if kind == "meshctl":
            verdicts.append(f"meshctl's added p99: {_median(added):+.0f} µs, budget ≤ {BUDGET_US:.0f} µs: "
                            f"{'met' if _median(added) <= BUDGET_US else 'NOT met'}")  # fmt: skip
    return "\n".join(lines + ["", *verdicts, ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sidecars", type=int, default=10)
    parser.add_argument("--qps", type=int, default=2000, help="requests a second per sidecar")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ratelimit-global-") as scratch:
        samples = run(args, Path(scratch))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ratelimit_global.json").write_text(json.dumps({"args": vars(args), "samples": samples}, indent=1))
    table = render(samples, args)
    (RESULTS / "ratelimit_global.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
