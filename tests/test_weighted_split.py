"""A 90/10 weighted_clusters route splits 10,000 keep-alive requests within ±1.5 points."""

from __future__ import annotations

from helpers.bootstrap import bootstrap, cluster, http_listener, route_configuration, virtual_host, weighted_route
from helpers.http_client import run_load

REQUESTS = 10_000
TOLERANCE = 1.5  # points; the binomial standard deviation at 10,000 draws is 0.3 points


def test_weighted_split_90_10(dataplane, port, echo_a, echo_b):
    routes = route_configuration("local", [virtual_host("all", [weighted_route({"a": 90, "b": 10})])])
    dataplane(bootstrap([http_listener("http", port, routes)], [cluster("a", echo_a.port), cluster("b", echo_b.port)]))

    result = run_load(port, total=REQUESTS, concurrency=6, duration=90)

    assert result.failures == [], result.failures[:10]
    assert result.total == REQUESTS
    assert set(result.by_upstream) <= {"a", "b"}, result.by_upstream
    share_a, share_b = result.share("a"), result.share("b")
    assert abs(share_a - 90) <= TOLERANCE and abs(share_b - 10) <= TOLERANCE, (
        f"split {share_a:.2f}/{share_b:.2f}, expected 90/10 ± {TOLERANCE}"
    )
