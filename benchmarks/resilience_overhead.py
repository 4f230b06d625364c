"""Issue 9's overhead budget: meshctl before resilience (188dc2b) against today's, plain and configured.

    python -m benchmarks.resilience_overhead --before /work/wt-before/.venv/bin/meshctl

Peers, all on the benchmark's bootstrap shape (one listener, one route, one cluster to the nginx
upstream), alternating per round (direct, before, after-unconfigured, after-configured, again...):
- direct: the client hits the upstream itself (the baseline of "added" latency);
- before: the `--before` command (meshctl built at 188dc2b, the engine before issue 9) on
  configs/meshctl-or-envoy.yaml;
- after-unconfigured: the `--after` command (default: MESHCTL, else `meshctl` on PATH) on the same
  bootstrap: no retry policy, no circuit breaker thresholds, no outlier detection;
- after-configured: the `--after` command on configs/meshctl-resilient.yaml: the same with a retry
  policy on the route, circuit breaker thresholds and outlier detection on the cluster, none of
  which the healthy upstream ever triggers.
Each round measures wrk HTTP/1.1 req/s (-c64), h2load HTTP/2 req/s (-c16 -m10) and fortio latency at
--qps (2,000) req/s; the table gives medians, min–max spreads, each peer's req/s as a ratio to
`before` in the same round (median of the rounds' ratios) against the issue's budget (≥ 0.97×
unconfigured, ≥ 0.95× configured), and p50/p99 added over direct. Proxies run one worker pinned
to CPU 1 and are started fresh per measurement; client and upstream on CPU 0 (BENCHMARKING.md).
Raw samples go to results/resilience_overhead.json, the table to results/resilience_overhead.md.
"""

from __future__ import annotations

import argparse
import os
import shlex

from benchmarks import overhead, peers

RESILIENT_BOOTSTRAP = peers.CONFIGS / "meshctl-resilient.yaml"
BEFORE = "before"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--before",
        default=os.environ.get("MESHCTL_BEFORE"),
        help="command running meshctl built at 188dc2b (env MESHCTL_BEFORE)",
    )


def compared(arguments: argparse.Namespace) -> tuple[overhead.Peer, ...]:
    if not arguments.before:
        raise SystemExit("give --before COMMAND (or MESHCTL_BEFORE): a meshctl built at 188dc2b")
    before, after = shlex.split(arguments.before), arguments.after_command
    return (
        overhead.Peer(overhead.meshctl_peer(BEFORE, before, peers.BOOTSTRAP), "before (188dc2b)"),
        overhead.Peer(overhead.meshctl_peer("after-unconfigured", after, peers.BOOTSTRAP),
                      "after, unconfigured", BEFORE, 0.97),
        overhead.Peer(overhead.meshctl_peer("after-configured", after, RESILIENT_BOOTSTRAP),
                      "after, retries + breakers + outlier configured", BEFORE, 0.95),
    )  # fmt: skip


COMPARISON = overhead.Comparison(
    module="resilience_overhead",
    title="Resilience overhead (issue 9)",
    peers=compared,
    add_arguments=add_arguments,
    versions=lambda arguments: {BEFORE: overhead.version_of(shlex.split(arguments.before or "true"))},
)

if __name__ == "__main__":
    raise SystemExit(overhead.main(COMPARISON))
