"""Issue 10's global limit budget: what one global RateLimit that never triggers adds to the p99 of
client sidecars, meshctl (batched quota) against Envoy (one call to the rate limit service per
request), both served by the same `meshctl serve`.

    python -m benchmarks.ratelimit_global [--sidecars 1] [--qps 1000] [--seconds 10] [--rounds 6]

The mesh is the one the tests build (tests/helpers): a real `meshctl serve`; two services,
`reviews` and `ratings`, registered as instances whose app is the benchmark's one nginx upstream;
two groups of `--sidecars` client sidecars, one calling each service directly (no server
sidecar): `meshctl run --token` over ADS, or Envoy 1.40 running the plane's compiled config from a
file with the workload certificate `meshctl identity agent` wrote.

Paired in time: in each round both groups run fortio at QPS for SECONDS at the same moment, one
group's service under a global rule of 10^9 requests a minute (`limited`), the other's under none
(`plain`), so a hiccup of this shared VM lands on both. The rule moves to the other service every
round, so each group is limited in half the rounds and a difference between the groups cancels.
`added` is the limited group's p99 minus the plain group's in the same round (each group's figure:
the median over its sidecars); the verdict is the median over rounds. Also counted per group: the
requests that waited for a call to the service, the calls made ahead of need (refills, on the
sidecar's own threads) and the sidecar's CPU per request, which is where refills would cost.
The budget (issue 10): meshctl's added p99 ≤ 50 µs. Raw samples and the table go to
results/ratelimit_global.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
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
SERVICES = ("reviews", "ratings")
SERVICE_PORT = 9080
BUDGET_US = 50.0
MESHCTL_CALLS = ("meshctl_cluster_ratelimit_ok_total", "meshctl_cluster_ratelimit_over_limit_total",
                 "meshctl_cluster_ratelimit_error_total")  # fmt: skip
MESHCTL_REFILLS = "meshctl_cluster_ratelimit_quota_refill_total"


def host_of(service: str) -> str:
    return f"{service}.default.svc.cluster.local"


def never_triggered(service: str) -> str:
    """A global rule on callers of `service` that no load here reaches."""
    return f"""
apiVersion: policy.meshctl.io/v1alpha1
kind: RateLimit
metadata: {{name: {service}-global}}
spec:
  host: {service}
  rules:
  - limit: {{requests: 1000000000, unit: minute}}
    scope: global
"""


def _admin(admin_port: int, path: str) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{admin_port}{path}", timeout=5) as response:
        return response.read().decode()


def status_through(port: int, service: str) -> int | None:
    """One request to the upstream through a sidecar: its status, None if there was no answer."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    headers = {"Host": f"{host_of(service)}:{SERVICE_PORT}"}
    try:
        with opener.open(urllib.request.Request(f"http://127.0.0.1:{port}/", headers=headers), timeout=3) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


def _sum(text: str, prefix: str) -> float:
    """The sum of every series whose name starts with `prefix`."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def meshctl_calls(admin_port: int, service: str) -> float:
    """The calls requests to `service` waited for (the route's cluster names the service)."""
    text = _admin(admin_port, "/stats/prometheus")
    return sum(_sum(text, f'{prefix}{{cluster="outbound|{SERVICE_PORT}||{host_of(service)}"}}') for prefix in MESHCTL_CALLS)


def meshctl_refills(admin_port: int, service: str) -> float:
    """Calls a meshctl sidecar made ahead of need, off the request path (no request waits on them)."""
    text = _admin(admin_port, "/stats/prometheus")
    return _sum(text, f'{MESHCTL_REFILLS}{{cluster="outbound|{SERVICE_PORT}||{host_of(service)}"}}')


def no_refills(admin_port: int, service: str) -> float:
    return 0.0  # Envoy reads no quota


def envoy_calls(admin_port: int, service: str) -> float:
    """`cluster.<route's cluster>.ratelimit.*` from /stats (Envoy's Prometheus names mangle
    cluster names that contain dots)."""
    text = _admin(admin_port, "/stats")
    cluster = re.escape(f"outbound|{SERVICE_PORT}||{host_of(service)}")
    return sum(int(n) for n in re.findall(rf"^cluster\.{cluster}\.ratelimit\.(?:ok|over_limit|error): (\d+)$", text, re.MULTILINE))


@dataclass
class Sidecar:
    """One client sidecar as the benchmark drives it: where to send, how to read its service calls."""

    service: str  # the service it calls (with --same-sidecar, one process serves two of these)
    port: int
    admin_port: int
    pid: int
    stop: Callable[[], None]
    calls: Callable[[int, str], float]  # the rate limit service calls requests waited for (admin port, service)
    refills: Callable[[int, str], float]  # calls made ahead of need, which no request waits for

    def service_calls(self) -> float:
        return self.calls(self.admin_port, self.service)

    def refill_calls(self) -> float:
        return self.refills(self.admin_port, self.service)

    def cpu_seconds(self) -> float:
        return procfs.tree_cpu_seconds(self.pid)


def start_meshctl_sidecars(plane: ControlPlane, service: str, count: int, directory: Path) -> list[Sidecar]:
    env = {k: v for k, v in plane.env.items() if k != "MESHCTL_TOKEN"}
    directory.mkdir(parents=True, exist_ok=True)
    started = []
    for number in range(count):
        client = f"{service}-client{number}"
        identity = ("--token", plane.join_token(client), "--xds-address", plane.xds_address)
        started.append(MeshSidecar(env, directory, client, *identity))
    for each in started:
        wait_until(lambda: status_through(each.outbound_port, service) == 200, 60, f"{each.service} reaches {service}")  # noqa: B023
    return [Sidecar(service, s.outbound_port, s.admin_port, s.popen.pid, s.stop, meshctl_calls, meshctl_refills) for s in started]


def start_envoy_sidecars(plane: ControlPlane, service: str, count: int, app_port: int, directory: Path) -> list[Sidecar]:
    sidecars = []
    for number in range(count):
        envoy, port = start_client_envoy(plane, f"{service}-envoy{number}", host_of(service), SERVICE_PORT, app_port,
                                         directory / f"{service}-envoy{number}")  # fmt: skip
        sidecars.append(Sidecar(service, port, envoy.extra["admin_port"], envoy.pid, envoy.stop, envoy_calls, no_refills))
    return sidecars


def load(sidecars: list[Sidecar], qps: int, seconds: float) -> list[loadgen.LoadResult]:
    """fortio at `qps` on every sidecar at once, each to the service it calls."""
    results: list[loadgen.LoadResult | Exception] = [RuntimeError("not run")] * len(sidecars)

    def one(index: int) -> None:
        sidecar = sidecars[index]
        try:
            results[index] = loadgen.fortio(f"http://127.0.0.1:{sidecar.port}/", qps=qps, connections=16, seconds=seconds,
                                            host=f"{host_of(sidecar.service)}:{SERVICE_PORT}")  # fmt: skip
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


def measure_pair(kind: str, groups: dict[str, list[Sidecar]], limited: str, plane: ControlPlane,
                 args: argparse.Namespace) -> list[dict]:  # fmt: skip
    """Both groups under load at once; one sample per group, `phase` saying which was limited."""
    everyone = [s for group in groups.values() for s in group]
    processes = {s.pid: s for s in everyone}  # with --same-sidecar, one process per two Sidecars
    before = {id(s): (s.service_calls(), s.refill_calls()) for s in everyone}
    cpu_before = {pid: s.cpu_seconds() for pid, s in processes.items()}
    plane_cpu_before = procfs.tree_cpu_seconds(plane.popen.pid)
    results = dict(zip(map(id, everyone), load(everyone, args.qps, args.seconds)))
    plane_cpu = procfs.tree_cpu_seconds(plane.popen.pid) - plane_cpu_before
    # A process's CPU per request over all it served: a shared sidecar's CPU cannot be split by service.
    served = {pid: sum(results[id(s)].requests for s in everyone if s.pid == pid) for pid in processes}
    cpu_per_request = {pid: (s.cpu_seconds() - cpu_before[pid]) / max(served[pid], 1) for pid, s in processes.items()}
    samples = []
    for service, group in groups.items():
        ran = [results[id(s)] for s in group]
        calls = sum(s.service_calls() - before[id(s)][0] for s in group)
        refills = sum(s.refill_calls() - before[id(s)][1] for s in group)
        requests = sum(r.requests for r in ran)
        sample = {
            "kind": kind, "phase": "limited" if service == limited else "plain", "service": service,
            "p50_us": statistics.median(r.latency_us["p50"] for r in ran),
            "p99_us": statistics.median(r.latency_us["p99"] for r in ran),
            "worst_p99_us": max(r.latency_us["p99"] for r in ran),
            "requests": requests, "req_per_s": sum(r.requests_per_second for r in ran),
            "non_2xx": sum(r.non_2xx for r in ran), "socket_errors": sum(r.socket_errors for r in ran),
            "service_calls": calls, "refill_calls": refills,
            "sidecar_cpu_us_per_request": statistics.median(cpu_per_request[s.pid] for s in group) * 1e6,
            "plane_cpu_s": plane_cpu,
        }  # fmt: skip
        print(f"  [{kind} {sample['phase']:7} {service}] {sample['req_per_s']:,.0f} req/s, p50 {sample['p50_us']:.0f} µs, "
              f"p99 {sample['p99_us']:.0f} µs (worst sidecar {sample['worst_p99_us']:.0f}), non-2xx {sample['non_2xx']}, "
              f"errors {sample['socket_errors']}, requests that waited for a call {calls:,.0f} ({calls / max(requests, 1):.2%}), "
              f"refills {refills:,.0f}, sidecar CPU {sample['sidecar_cpu_us_per_request']:.1f} µs/request", flush=True)  # fmt: skip
        samples.append(sample)
    return samples


def limit_only(plane: ControlPlane, limited: str) -> None:
    """The never-triggered rule on callers of `limited`, and on no other service."""
    apply(plane, never_triggered(limited))
    for service in SERVICES:
        if service != limited:
            plane.meshctl("delete", "ratelimit", f"{service}-global")  # absent: refused, harmless


def wait_for_filter(sidecars: list[Sidecar], present: bool) -> None:
    """Until a request through each sidecar calls the service (present) or does not (absent)."""
    for sidecar in sidecars:
        def settled() -> bool:
            before = sidecar.service_calls()  # noqa: B023
            status_through(sidecar.port, sidecar.service)  # noqa: B023
            return (sidecar.service_calls() > before) == present  # noqa: B023

        wait_until(settled, 30, f"the global filter {'in' if present else 'out of'} a sidecar", step=0.3)


def run(args: argparse.Namespace, rundir: Path) -> list[dict]:
    upstream = peers.start(peers.UPSTREAM, rundir / "upstream", cpu=peers.LOADGEN_CPU)
    plane = start_control_plane(rundir / "plane")
    samples = []
    try:
        for service in SERVICES:
            register(plane, f"{service}-v1", service=service, version="v1", servicePort=SERVICE_PORT,
                     appPort=peers.UPSTREAM_HTTP1_PORT, ready=True)  # fmt: skip
        if args.same_sidecar:
            # One group of processes, each calling both services: the limited and plain requests
            # share a process, its threads and their hiccups; only the filter tells them apart.
            shared = start_meshctl_sidecars(plane, SERVICES[0], args.sidecars, rundir / "meshctl")
            for service in SERVICES[1:]:
                for sidecar in shared:
                    wait_until(lambda: status_through(sidecar.port, service) == 200, 60, f"a sidecar reaches {service}")  # noqa: B023
            meshctl = {service: [dataclasses.replace(s, service=service) for s in shared] for service in SERVICES}
        else:
            meshctl = {service: start_meshctl_sidecars(plane, service, args.sidecars, rundir / "meshctl") for service in SERVICES}
        try:
            for number in range(1, args.rounds + 1):
                limited = SERVICES[(number - 1) % len(SERVICES)]
                print(f"round {number}/{args.rounds}: the rule on callers of {limited}", flush=True)
                limit_only(plane, limited)
                for service, group in meshctl.items():
                    wait_for_filter(group, service == limited)
                samples += [{"round": number, **s} for s in measure_pair("meshctl", meshctl, limited, plane, args)]
                # Envoy compiles the plane's config when it starts: fresh Envoys per round.
                envoys = {service: start_envoy_sidecars(plane, service, args.sidecars, peers.UPSTREAM_HTTP1_PORT,
                                                        rundir / f"envoy-{number}") for service in SERVICES}  # fmt: skip
                try:
                    samples += [{"round": number, **s} for s in measure_pair("envoy", envoys, limited, plane, args)]
                finally:
                    for envoy in (e for group in envoys.values() for e in group):
                        envoy.stop()
        finally:
            for sidecar in {s.pid: s for group in meshctl.values() for s in group}.values():
                sidecar.stop()
    finally:
        plane.stop()
        upstream.stop()
    return samples


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def render(samples: list[dict], args: argparse.Namespace) -> str:
    lines = [
        (f"# Global rate limit, never triggered: 2 groups of {args.sidecars} client sidecar(s) × {args.qps:,} req/s "
         f"at once, {args.seconds:g} s, {args.rounds} rounds"
         f"{'; meshctl: one sidecar group serving both (--same-sidecar)' if args.same_sidecar else ''}"),
        "",
        ("| data plane | p50 plain | p50 limited | p99 plain | p99 limited | added p50 | added p99 (per round) | "
         "requests that waited for a call | refill calls per request | sidecar CPU µs/request plain → limited | "
         "plane CPU s per round | errors |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    verdicts = []
    for kind in ("meshctl", "envoy"):
        rounds = sorted({s["round"] for s in samples if s["kind"] == kind})
        pairs = [
            ({s["phase"]: s for s in samples if s["kind"] == kind and s["round"] == r}) for r in rounds
        ]
        pairs = [p for p in pairs if {"plain", "limited"} <= p.keys()]
        plain = [p["plain"] for p in pairs]
        limited = [p["limited"] for p in pairs]
        added = [p["limited"]["p99_us"] - p["plain"]["p99_us"] for p in pairs]
        added_p50 = [p["limited"]["p50_us"] - p["plain"]["p50_us"] for p in pairs]
        calls = _median([s["service_calls"] / max(s["requests"], 1) for s in limited])
        refills = _median([s["refill_calls"] / max(s["requests"], 1) for s in limited])
        errors = sum(s["non_2xx"] + s["socket_errors"] for s in plain + limited)
        lines.append(
            f"| {kind} | {_median([s['p50_us'] for s in plain]):.0f} µs | {_median([s['p50_us'] for s in limited]):.0f} µs "
            f"| {_median([s['p99_us'] for s in plain]):.0f} µs | {_median([s['p99_us'] for s in limited]):.0f} µs "
            f"| {_median(added_p50):+.0f} µs | {_median(added):+.0f} µs ({', '.join(f'{a:+.0f}' for a in added)}) "
            f"| {calls:.4%} | {refills:.4%} "
            f"| {_median([s['sidecar_cpu_us_per_request'] for s in plain]):.1f} → "
            f"{_median([s['sidecar_cpu_us_per_request'] for s in limited]):.1f} "
            f"| {_median([s['plane_cpu_s'] for s in limited]):.1f} | {errors} |"
        )  # fmt: skip
        if kind == "meshctl":
            verdicts.append(f"meshctl's added p99: {_median(added):+.0f} µs, budget ≤ {BUDGET_US:.0f} µs: "
                            f"{'met' if _median(added) <= BUDGET_US else 'NOT met'}")  # fmt: skip
    return "\n".join(lines + ["", *verdicts, ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sidecars", type=int, default=1, help="client sidecars per group (two groups)")
    parser.add_argument("--qps", type=int, default=1000, help="requests a second per sidecar")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--same-sidecar", action="store_true",
                        help="meshctl: each sidecar calls both services (limited and plain share its process)")
    parser.add_argument("--rounds", type=int, default=6, help="an even count pairs each group limited and plain alike")
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
