"""Issue 10's overhead budget: a local rate limit configured but never triggered, on meshctl and on Envoy.

    python -m benchmarks.ratelimit_overhead

Peers, alternating per round: direct (the client hits the upstream itself); meshctl and Envoy on
configs/meshctl-or-envoy.yaml (one listener, one route, one cluster to the nginx upstream); and each
of them on configs/meshctl-ratelimited.yaml, the same bootstrap with what the RateLimit compiler
emits for one rule: the local_ratelimit filter, a per-virtual-host config with a default and a
descriptor bucket that never run out, and a route action giving every GET the descriptor. The
budget (issue 10): meshctl limited keeps ≥ 0.97× meshctl plain's req/s, same round; Envoy's own
ratio is shown beside it. Raw samples: results/ratelimit_overhead.json; table: results/ratelimit_overhead.md.
"""

from __future__ import annotations

import argparse

from benchmarks import overhead, peers

LIMITED_BOOTSTRAP = peers.CONFIGS / "meshctl-ratelimited.yaml"


def envoy_peer(name: str, bootstrap) -> peers.PeerSpec:
    """Envoy as benchmarks/peers.py runs it, on `bootstrap`."""
    return peers.PeerSpec(
        name, peers.MESH_PORT, peers.MESH_PORT,
        lambda rundir: [peers.envoy_binary() or "envoy", "-c", str(bootstrap), "--concurrency", "1",
                        "--disable-hot-restart", "--log-level", "warn"],
        peers.ENVOY.unavailable_reason,
    )  # fmt: skip


def compared(arguments: argparse.Namespace) -> tuple[overhead.Peer, ...]:
    after = arguments.after_command
    return (
        overhead.Peer(overhead.meshctl_peer("meshctl", after, peers.BOOTSTRAP), "meshctl"),
        overhead.Peer(overhead.meshctl_peer("meshctl-limited", after, LIMITED_BOOTSTRAP),
                      "meshctl, local rate limit not triggered", "meshctl", 0.97),
        overhead.Peer(envoy_peer("envoy", peers.BOOTSTRAP), "Envoy"),
        overhead.Peer(envoy_peer("envoy-limited", LIMITED_BOOTSTRAP),
                      "Envoy, local rate limit not triggered", "envoy"),
    )  # fmt: skip


COMPARISON = overhead.Comparison(
    module="ratelimit_overhead",
    title="Local rate limit overhead (issue 10)",
    peers=compared,
)

if __name__ == "__main__":
    raise SystemExit(overhead.main(COMPARISON))
