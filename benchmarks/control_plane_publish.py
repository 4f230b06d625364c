"""How long the control plane takes to compile the mesh and build every sidecar's snapshot
(no network): `python benchmarks/control_plane_publish.py`. Propagation to running sidecars adds
the ADS push and the engines' apply on top of this."""

from __future__ import annotations

import resource
import time

from meshctl.control.registry import Sidecar
from meshctl.control.snapshot import SnapshotCache
from meshctl.control.xds_service import Publisher


def virtual_service(index: int, v1_weight: int) -> dict:
    host = f"svc{index}"
    return {
        "kind": "VirtualService",
        "metadata": {"name": host, "namespace": "default"},
        "spec": {
            "hosts": [host],
            "http": [
                {
                    "match": [{"headers": {"end-user": {"exact": "jason"}}}],
                    "route": [{"destination": {"host": host, "subset": "v2"}}],
                },
                {
                    "route": [
                        {"destination": {"host": host, "subset": "v1"}, "weight": v1_weight},
                        {"destination": {"host": host, "subset": "v2"}, "weight": 100 - v1_weight},
                    ]
                },
            ],
        },
    }


def destination_rule(index: int) -> dict:
    subsets = [{"name": v, "labels": {"version": v}} for v in ("v1", "v2")]
    return {
        "kind": "DestinationRule",
        "metadata": {"name": f"svc{index}", "namespace": "default"},
        "spec": {"host": f"svc{index}", "subsets": subsets},
    }


def main() -> None:
    print("| services | routes | sidecars | first publish | weight change |")
    print("|---:|---:|---:|---:|---:|")
    for services, sidecar_count in ((5, 100), (10, 100), (100, 100), (500, 100)):
        resources = [
            f(i)
            for i in range(services)
            for f in (lambda i: virtual_service(i, 90), destination_rule)
        ]
        sidecars = [
            Sidecar(
                node_id=f"n{i}",
                service=f"svc{i % services}",
                version=f"v{1 + i % 2}",
                app_port=20000 + i,
                inbound_port=30000 + i,
                outbound_port=15001,
                ready=True,
            )
            for i in range(sidecar_count)
        ]
        publisher = Publisher(SnapshotCache())
        started = time.perf_counter()
        publisher.publish(1, resources, 0, sidecars)
        first = time.perf_counter() - started
        resources[0] = virtual_service(0, 50)
        started = time.perf_counter()
        publisher.publish(2, resources, 0, sidecars)
        change = time.perf_counter() - started
        print(
            f"| {services} | {services * 2} | {sidecar_count} | {first * 1000:.0f} ms"
            f" | {change * 1000:.0f} ms |"
        )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS of this process: {rss:.0f} MB")


if __name__ == "__main__":
    main()
