"""What Istio's standard metrics cost per request: user-space instructions under callgrind of one
meshctl build on the benchmark's bootstrap, without and with Istio metrics on its listener.

    python -m benchmarks.istio_metrics_instructions [--after MESHCTL] [--requests 2000] [--rounds 2] [--http2]

Same method as benchmarks/instructions.py (callgrind, 500 warm-up requests, counters zeroed, then
`--requests` by h2load), on configs/meshctl-or-envoy.yaml (no Istio metrics) and
configs/meshctl-istio-metrics.yaml (the same with listener, endpoint and cluster metadata, so each
request updates one istio_requests_total series and its three histograms).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import tempfile
from pathlib import Path

from benchmarks import instructions, overhead, peers

ISTIO_BOOTSTRAP = peers.CONFIGS / "meshctl-istio-metrics.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--after", default=os.environ.get("MESHCTL", "meshctl"), help="the meshctl command")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--http2", action="store_true", help="h2c downstream instead of HTTP/1.1")
    arguments = parser.parse_args(argv)
    for tool in ("valgrind", "callgrind_control", "h2load"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not found: apt-get install valgrind nghttp2-client")
    command = shlex.split(arguments.after)
    compared = [
        overhead.meshctl_peer("istio-off", command, peers.BOOTSTRAP),
        overhead.meshctl_peer("istio-on", command, ISTIO_BOOTSTRAP),
    ]
    rundir = Path(tempfile.mkdtemp(prefix="istio-instructions-"))
    upstream = peers.start(peers.UPSTREAM, rundir / "upstream", cpu=peers.LOADGEN_CPU)
    counts: dict[str, list[float]] = {spec.name: [] for spec in compared}
    try:
        for number in range(1, arguments.rounds + 1):
            for spec in compared:
                per_request = instructions.measure(spec, arguments.requests, arguments.http2, rundir)
                counts[spec.name].append(per_request)
                print(f"[round {number}] {spec.name}: {per_request:,.0f} instructions/request", flush=True)
    finally:
        upstream.stop()
    off = statistics.median(counts["istio-off"])
    print("\n| peer | instructions / request, median (runs) | vs off |\n|---|---|---|")
    for spec in compared:
        runs = counts[spec.name]
        median = statistics.median(runs)
        print(f"| {spec.name} | {median:,.0f} ({', '.join(f'{run:,.0f}' for run in runs)}) | {median / off:.3f}× |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
