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

from benchmarks import instructions, peers

ISTIO_BOOTSTRAP = peers.CONFIGS / "meshctl-istio-metrics.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--after", default=os.environ.get("MESHCTL", "meshctl"), help="the meshctl command")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--http2", action="store_true", help="h2c downstream instead of HTTP/1.1")
    arguments = parser.parse_args(argv)
    instructions.compare_bootstraps(shlex.split(arguments.after), {"istio-off": peers.BOOTSTRAP, "istio-on": ISTIO_BOOTSTRAP},
                                    arguments.requests, arguments.rounds, arguments.http2)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
