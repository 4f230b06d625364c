"""Istio's Grafana dashboards on meshctl: a real Prometheus (Debian's) scrapes the sidecars of a small
mesh (targets from `meshctl serve --prometheus-file-sd`) and answers the Istio Service and Workload
dashboards' queries: requests per second by destination workload, and P90 latency from
istio_request_duration_milliseconds_bucket."""

from __future__ import annotations

import time
from collections import Counter

import pytest
from helpers.control_plane import start_control_plane
from helpers.mesh import MeshSidecar, ask_host, echo_instance, stop_all, wait_until
from helpers.prometheus_server import start_prometheus

pytestmark = pytest.mark.meshctl_only

# Istio's Grafana dashboards (istio-mesh-dashboard, istio-workload-dashboard), as written there.
RPS_BY_WORKLOAD = 'sum(rate(istio_requests_total{reporter="destination"}[1m])) by (destination_workload)'
P90_BY_WORKLOAD = (
    'histogram_quantile(0.90, sum(rate(istio_request_duration_milliseconds_bucket{reporter="source"}[1m]))'
    " by (le, destination_workload))"
)


def test_prometheus_answers_istios_dashboard_queries(tmp_path):
    targets = tmp_path / "targets.json"
    plane = start_control_plane(tmp_path / "plane", "--prometheus-file-sd", str(targets))
    sidecars: list[MeshSidecar] = []
    prometheus = None
    try:
        v1 = echo_instance(plane.env, tmp_path, "reviews", "v1", lease=2.0)
        v2 = echo_instance(plane.env, tmp_path, "reviews", "v2", lease=2.0)
        client = MeshSidecar(plane.env, tmp_path, "productpage", "--version", "v1", lease=2.0)
        sidecars += [v1, v2, client]
        wait_until(lambda: ask_host(client.outbound_port) in ("v1", "v2"), 30, "reviews answers", 0.1)
        wait_until(lambda: {ask_host(client.outbound_port) for _ in range(6)} == {"v1", "v2"}, 20, "both versions answer", 0.1)
        config = plane.meshctl("prometheus-config", "--use-file-sd", str(targets), "--scrape-interval", "1s")
        assert config.returncode == 0, config.stderr
        prometheus = start_prometheus(tmp_path / "prometheus", config.stdout)
        answers = Counter()
        deadline = time.monotonic() + 6  # several scrapes while traffic flows: rate() needs two
        while time.monotonic() < deadline:
            answers[ask_host(client.outbound_port)] += 1
            time.sleep(0.02)
        assert set(answers) == {"v1", "v2"}, answers

        def per_workload(query: str) -> dict[str, float] | list:
            samples = prometheus.query(query)
            found = {s["metric"].get("destination_workload", ""): float(s["value"][1]) for s in samples}
            return found if set(found) >= {"reviews-v1", "reviews-v2"} and all(found[w] > 0 for w in ("reviews-v1", "reviews-v2")) else samples

        wait_until(lambda: isinstance(per_workload(RPS_BY_WORKLOAD), dict), 15, "requests per second by destination workload", 0.5)
        rates = per_workload(RPS_BY_WORKLOAD)
        print(f"answers {dict(answers)}, rps by workload {rates}")
        wait_until(lambda: isinstance(per_workload(P90_BY_WORKLOAD), dict), 10, "P90 by destination workload", 0.5)
        p90 = per_workload(P90_BY_WORKLOAD)
        # Requests made before reviews' endpoints arrived have an unknown destination (no rate now).
        assert all(0 < p90[workload] <= 1000 for workload in ("reviews-v1", "reviews-v2")), p90
    finally:
        if prometheus is not None:
            print(f"--- prometheus ---\n{prometheus.log()[-2000:]}")
            prometheus.stop()
        stop_all(sidecars, plane)
