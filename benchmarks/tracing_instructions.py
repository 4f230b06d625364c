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

from benchmarks import instructions, peers

TRACED_BOOTSTRAP = peers.CONFIGS / "meshctl-traced.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meshctl", default="meshctl", help="the meshctl command to measure")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--http2", action="store_true", help="h2c downstream instead of HTTP/1.1")
    arguments = parser.parse_args(argv)
    bootstraps = {"not configured": peers.BOOTSTRAP, "tracing at 1 %": TRACED_BOOTSTRAP}
    instructions.compare_bootstraps(shlex.split(arguments.meshctl), bootstraps, arguments.requests, arguments.rounds, arguments.http2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
