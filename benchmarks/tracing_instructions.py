"""Instructions per proxied request with tracing configured at 1 % vs not configured (issue 11), under callgrind.

    python -m benchmarks.tracing_instructions [--meshctl meshctl] [--requests 2000] [--rounds 2] [--http2]

The same measurement as benchmarks/instructions.py (callgrind counts the user-space instructions
a proxy retires; deterministic where req/s on this VM is not), for two peers of one build: the
benchmark's bootstrap as it is, and the same with the HCM tracing Istio configures by default
(OpenTelemetry tracer, 1 % random sampling; configs/meshctl-traced.yaml).
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import statistics
import tempfile
from pathlib import Path

from benchmarks import overhead, peers
from benchmarks.instructions import measure

TRACED_BOOTSTRAP = peers.CONFIGS / "meshctl-traced.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meshctl", default="meshctl", help="the meshctl command to measure")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--http2", action="store_true", help="h2c downstream instead of HTTP/1.1")
    arguments = parser.parse_args(argv)
    for tool in ("valgrind", "callgrind_control", "h2load"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not found: apt-get install valgrind nghttp2-client")
    command = shlex.split(arguments.meshctl)
    compared = {
        "not configured": overhead.meshctl_peer("untraced", command, peers.BOOTSTRAP),
        "tracing at 1 %": overhead.meshctl_peer("traced", command, TRACED_BOOTSTRAP),
    }
    rundir = Path(tempfile.mkdtemp(prefix="tracing-instructions-"))
    upstream = peers.start(peers.UPSTREAM, rundir / "upstream", cpu=peers.LOADGEN_CPU)
    counts: dict[str, list[float]] = {label: [] for label in compared}
    try:
        for number in range(1, arguments.rounds + 1):
            for label, spec in compared.items():
                counts[label].append(measure(spec, arguments.requests, arguments.http2, rundir))
                print(f"[round {number}] {label}: {counts[label][-1]:,.0f} instructions/request", flush=True)
    finally:
        upstream.stop()
    base = statistics.median(counts["not configured"])
    print("\n| peer | instructions / request, median (runs) | vs not configured |\n|---|---|---|")
    for label, runs in counts.items():
        median = statistics.median(runs)
        print(f"| {label} | {median:,.0f} ({', '.join(f'{r:,.0f}' for r in runs)}) | {median / base:.3f}× |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
