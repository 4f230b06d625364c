"""What a never-triggered global rate limit adds to each request, counted in user-space
instructions under valgrind's callgrind: issue 10's budget without this VM's p99 noise.

    python -m benchmarks.ratelimit_global_instructions [--requests 2000] [--rounds 3]

benchmarks/ratelimit_global.py measures the added p99 end to end, paired in time; on this shared
2-core VM a round's p99 still wanders by a millisecond, twenty times the 50 µs budget. This counts
instead. One `meshctl run` client sidecar runs under callgrind in the mesh ratelimit_global builds
(a real `meshctl serve`, `reviews` and `ratings` served by the one nginx upstream) with the global
rule of 10^9 requests a minute on callers of `reviews` only. Per round it is sent `--requests`
requests to `ratings` (plain) and as many to `reviews` (limited), in alternating order, its counters
zeroed before and dumped after each batch: the difference per request is everything the limit adds
to the sidecar's user-space work, the descriptors, the quota decision and the refill calls made
ahead of need (counted with the requests they serve). Instructions are a work figure, not time,
and leave out the kernel; compared with the plain requests' count they say what share of a
request's user-space work the limit is. Needs valgrind and fortio.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks import instructions, loadgen, peers

# The mesh scaffolding (tests/helpers) as ratelimit_global imports it, which puts tests/ on sys.path.
from benchmarks.ratelimit_global import (
    SERVICE_PORT,
    SERVICES,
    MeshSidecar,
    host_of,
    limit_only,
    meshctl_calls,
    meshctl_refills,
    register,
    start_control_plane,
    status_through,
    wait_until,
)

WARMUP_REQUESTS = 500
LIMITED, PLAIN = SERVICES  # the rule is on callers of the first
# Under callgrind the sidecar (Python, then the engine) starts some 50x slower.
READY_TIMEOUT = 300.0


def send(port: int, service: str, requests: int) -> None:
    """Exactly `requests` requests to `service` through the sidecar, 8 connections, closed loop."""
    command = [loadgen.find_tool("fortio") or "fortio", "load", "-quiet", "-qps", "0", "-c", "8", "-n", str(requests),
               "-H", f"Host: {host_of(service)}:{SERVICE_PORT}", f"http://127.0.0.1:{port}/"]  # fmt: skip
    done = subprocess.run(peers.pinned(peers.LOADGEN_CPU, command), capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0 or "Code 200 : " not in done.stdout + done.stderr:
        raise peers.PeerFailed(f"fortio to {service} failed:\n{(done.stdout + done.stderr)[-800:]}")
    if any(f"Code {code} : " in done.stdout + done.stderr for code in range(300, 600)):
        raise peers.PeerFailed(f"fortio to {service} got non-2xx answers:\n{(done.stdout + done.stderr)[-800:]}")


def counted(sidecar: MeshSidecar, outdir: Path, service: str, requests: int, label: str) -> float:
    """Instructions per request of one batch to `service`."""
    instructions.callgrind_control("--zero", sidecar.popen.pid)
    send(sidecar.outbound_port, service, requests)
    instructions.callgrind_control(f"--dump={label}", sidecar.popen.pid)
    return instructions.dumped_instructions(outdir, "sidecar", label) / requests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    for tool in ("valgrind", "callgrind_control"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not found: apt-get install valgrind")
    rundir = Path(tempfile.mkdtemp(prefix="ratelimit-global-instructions-"))
    outdir = rundir / "callgrind"
    outdir.mkdir()
    upstream = peers.start(peers.UPSTREAM, rundir / "upstream", cpu=peers.LOADGEN_CPU)
    plane = start_control_plane(rundir / "plane")
    counts: dict[str, list[float]] = {LIMITED: [], PLAIN: []}
    refills = calls = 0.0
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    try:
        for service in SERVICES:
            register(plane, f"{service}-v1", service=service, version="v1", servicePort=SERVICE_PORT,
                     appPort=peers.UPSTREAM_HTTP1_PORT, ready=True)  # fmt: skip
        limit_only(plane, LIMITED)
        env = {k: v for k, v in plane.env.items() if k != "MESHCTL_TOKEN"}
        tool = ["valgrind", "--tool=callgrind", "--trace-children=yes", f"--callgrind-out-file={outdir}/sidecar.%p.out"]
        # A long lease: its renewals are Python work that would land in whichever batch they fall in.
        sidecar = MeshSidecar(env, rundir, "client", "--token", plane.join_token("client"), "--xds-address",
                              plane.xds_address, lease=600.0, under=tool)  # fmt: skip
        try:
            for service in SERVICES:
                wait_until(lambda: status_through(sidecar.outbound_port, service) == 200, READY_TIMEOUT,  # noqa: B023
                           f"the sidecar under callgrind reaches {service}")  # fmt: skip
            # The first request to the limited service finds no quota and calls: the filter is in.
            wait_until(lambda: meshctl_calls(sidecar.admin_port, LIMITED) > 0, 60, "the global filter in the sidecar")
            for service in SERVICES:
                send(sidecar.outbound_port, service, WARMUP_REQUESTS)
            for number in range(1, args.rounds + 1):
                order = (PLAIN, LIMITED) if number % 2 else (LIMITED, PLAIN)
                for service in order:
                    before = (meshctl_refills(sidecar.admin_port, service), meshctl_calls(sidecar.admin_port, service))
                    per_request = counted(sidecar, outdir, service, args.requests, f"{service}-{number}")
                    refills += meshctl_refills(sidecar.admin_port, service) - before[0]
                    calls += meshctl_calls(sidecar.admin_port, service) - before[1]
                    counts[service].append(per_request)
                    print(f"[round {number}] {service} ({'limited' if service == LIMITED else 'plain'}): "
                          f"{per_request:,.0f} instructions/request", flush=True)  # fmt: skip
        finally:
            sidecar.stop()
    finally:
        plane.stop()
        upstream.stop()
    plain, limited = statistics.median(counts[PLAIN]), statistics.median(counts[LIMITED])
    added = [lim - pl for lim, pl in zip(counts[LIMITED], counts[PLAIN])]
    total = args.requests * args.rounds
    lines = [
        f"### Instructions per request a never-triggered global limit adds (callgrind, HTTP/1.1, fortio -c8, {args.requests:,} requests a batch)",
        "",
        f"- command: `python -m benchmarks.ratelimit_global_instructions --requests {args.requests} --rounds {args.rounds}`; started {started}",
        f"- limited batches: {refills:,.0f} refill calls ({refills / total:.3%} of requests), {calls:,.0f} calls requests waited for",
        "",
        "| requests | instructions / request, median (runs) |",
        "|---|---|",
        f"| plain ({PLAIN}) | {plain:,.0f} ({', '.join(f'{c:,.0f}' for c in counts[PLAIN])}) |",
        f"| limited ({LIMITED}) | {limited:,.0f} ({', '.join(f'{c:,.0f}' for c in counts[LIMITED])}) |",
        f"| added by the limit | {statistics.median(added):+,.0f} ({', '.join(f'{a:+,.0f}' for a in added)}) = {limited / plain:.3f}× |",
    ]  # fmt: skip
    print("\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
