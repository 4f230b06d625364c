"""Instructions per proxied request, counted by valgrind's callgrind: a noise-free companion to req/s.

    python -m benchmarks.instructions --before /tmp/before-venv/bin/meshctl [--requests 2000]

On a shared 2-core VM a req/s ratio wanders by ±15 % from round to round (steal time, the client
and upstream sharing a core), more than the 3–5 % budgets it is meant to judge. The count of
instructions a proxy executes per request does not wander: callgrind runs the proxy on a
simulated CPU and counts every user-space instruction it retires, so two runs of one build agree
within a fraction of a percent. It leaves out the kernel (the syscalls, which a change to request
bookkeeping does not alter) and cache misses, so it bounds what user-space work a change adds; it
is not a throughput figure. Quote it beside the req/s table, never instead of it.

Peers: the same three as benchmarks/resilience_overhead.py (before 188dc2b; after unconfigured;
after with retries, circuit breakers and outlier detection configured), each started under
callgrind on the benchmark's bootstrap, warmed with 500 requests, its counters zeroed, then sent
`--requests` requests by h2load (HTTP/1.1, 8 connections; `--http2` for h2c, 8 connections x 10
streams) and its counters dumped. Each peer runs `--rounds` times; the table gives the median
instructions per request and the ratio to `before`. Needs valgrind (Debian `valgrind`) and h2load.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import overhead, peers, resilience_overhead

WARMUP_REQUESTS = 500
# Under callgrind the proxy runs some 50x slower: its start (Python, then the engine) takes a while.
READY_TIMEOUT = 180.0


def callgrind_peer(spec: peers.PeerSpec, outdir: Path) -> peers.PeerSpec:
    """`spec` run under callgrind. --trace-children follows `meshctl run`'s exec into the sidecar
    (the same PID), where the counting that matters happens."""
    tool = [
        "valgrind", "--tool=callgrind", "--trace-children=yes",
        f"--callgrind-out-file={outdir}/{spec.name}.%p.out",
    ]  # fmt: skip
    assert spec.command is not None
    return peers.PeerSpec(spec.name, spec.http1_port, spec.h2c_port,
                          lambda rundir: [*tool, *spec.command(rundir)], spec.unavailable_reason)  # fmt: skip


def h2load(port: int, requests: int, http2: bool) -> None:
    shape = ["-c", "8", "-m", "10"] if http2 else ["--h1", "-c", "8"]
    done = subprocess.run(["h2load", *shape, "-n", str(requests), f"http://127.0.0.1:{port}/"],
                          capture_output=True, text=True, check=False, timeout=600)  # fmt: skip
    succeeded = re.search(r"(\d+) succeeded", done.stdout)
    if done.returncode != 0 or not succeeded or int(succeeded.group(1)) != requests:
        raise peers.PeerFailed(
            f"h2load did not complete {requests} requests:\n{done.stdout[-800:]}{done.stderr[-400:]}"
        )


def callgrind_control(action: str, pid: int) -> None:
    subprocess.run(
        ["callgrind_control", action, str(pid)], capture_output=True, check=True, timeout=120
    )


def dumped_instructions(outdir: Path, name: str, trigger: str) -> int:
    """Ir of the dump `trigger` (callgrind writes one file per dump, named after the PID)."""
    for path in outdir.glob(f"{name}.*.out*"):
        text = path.read_text(errors="replace")
        if f"Trigger: dump {trigger}" in text:
            totals = re.search(r"^(?:totals|summary): (\d+)", text, re.MULTILINE)
            if totals:
                return int(totals.group(1))
    raise peers.PeerFailed(f"no callgrind dump {trigger!r} for {name} in {outdir}")


def measure(spec: peers.PeerSpec, requests: int, http2: bool, rundir: Path) -> float:
    """Instructions per request of one run of `spec`."""
    outdir = Path(tempfile.mkdtemp(prefix=f"{spec.name}-", dir=rundir))
    peer = peers.start(callgrind_peer(spec, outdir), outdir, ready_timeout=READY_TIMEOUT)
    try:
        port = spec.h2c_port if http2 else spec.http1_port
        h2load(port, WARMUP_REQUESTS, http2)
        assert peer.pid is not None
        callgrind_control("--zero", peer.pid)
        h2load(port, requests, http2)
        callgrind_control("--dump=load", peer.pid)
        return dumped_instructions(outdir, spec.name, "load") / requests
    finally:
        peer.stop()


def require_tools() -> None:
    for tool in ("valgrind", "callgrind_control", "h2load"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not found: apt-get install valgrind nghttp2-client")


def compare_bootstraps(command: list[str], bootstraps: dict[str, Path], requests: int, rounds: int, http2: bool) -> None:
    """One meshctl build on each bootstrap (the first is the baseline), `rounds` runs each in
    turn; prints every run and a table of medians and ratios to the baseline."""
    require_tools()
    compared = {label: overhead.meshctl_peer(label.replace(" ", "-").replace("%", "pct"), command, bootstrap)
                for label, bootstrap in bootstraps.items()}  # fmt: skip
    rundir = Path(tempfile.mkdtemp(prefix="instructions-"))
    upstream = peers.start(peers.UPSTREAM, rundir / "upstream", cpu=peers.LOADGEN_CPU)
    counts: dict[str, list[float]] = {label: [] for label in compared}
    try:
        for number in range(1, rounds + 1):
            for label, spec in compared.items():
                counts[label].append(measure(spec, requests, http2, rundir))
                print(f"[round {number}] {label}: {counts[label][-1]:,.0f} instructions/request", flush=True)
    finally:
        upstream.stop()
    baseline = next(iter(counts))
    base = statistics.median(counts[baseline])
    print(f"\n| peer | instructions / request, median (runs) | vs {baseline} |\n|---|---|---|")
    for label, runs in counts.items():
        median = statistics.median(runs)
        print(f"| {label} | {median:,.0f} ({', '.join(f'{r:,.0f}' for r in runs)}) | {median / base:.3f}× |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=os.environ.get("MESHCTL_BEFORE"),
                        help="command running meshctl built at 188dc2b (env MESHCTL_BEFORE)")  # fmt: skip
    parser.add_argument(
        "--after", default=os.environ.get("MESHCTL", "meshctl"), help="today's meshctl command"
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--http2", action="store_true", help="h2c downstream instead of HTTP/1.1")
    arguments = parser.parse_args(argv)
    if not arguments.before:
        raise SystemExit("give --before COMMAND (or MESHCTL_BEFORE): a meshctl built at 188dc2b")
    require_tools()
    namespace = argparse.Namespace(
        before=arguments.before, after_command=shlex.split(arguments.after)
    )
    compared = resilience_overhead.compared(namespace)
    rundir = Path(tempfile.mkdtemp(prefix="instructions-"))
    upstream = peers.start(peers.UPSTREAM, rundir / "upstream", cpu=peers.LOADGEN_CPU)
    counts: dict[str, list[float]] = {peer.spec.name: [] for peer in compared}
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    try:
        for number in range(1, arguments.rounds + 1):
            for peer in compared:
                per_request = measure(peer.spec, arguments.requests, arguments.http2, rundir)
                counts[peer.spec.name].append(per_request)
                print(
                    f"[round {number}] {peer.spec.name}: {per_request:,.0f} instructions/request",
                    flush=True,
                )
    finally:
        upstream.stop()
    before = statistics.median(counts[resilience_overhead.BEFORE])
    protocol = "h2c, h2load -c8 -m10" if arguments.http2 else "HTTP/1.1, h2load --h1 -c8"
    lines = [
        f"### User-space instructions per request under callgrind ({protocol}, {arguments.requests:,} requests)",
        "",
        f"- command: `python -m benchmarks.instructions {shlex.join(argv or sys.argv[1:])}`; started {started}",
        "",
        "| peer | instructions / request, median (runs) | vs before |",
        "|---|---|---|",
    ]
    for peer in compared:
        runs = counts[peer.spec.name]
        median = statistics.median(runs)
        listed = ", ".join(f"{run:,.0f}" for run in runs)
        lines.append(f"| {peer.label} | {median:,.0f} ({listed}) | {median / before:.3f}× |")
    print("\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
