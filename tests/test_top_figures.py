"""`meshctl top`'s arithmetic without processes: the histogram quantile against hand-computed
values, and per-service figures from two reads of sidecars' counters, restarts included."""

from __future__ import annotations

import math

import pytest
from meshctl.cli._quantile import histogram_quantile
from meshctl.cli._top_figures import parse_counters, service_of, window_between

INF = math.inf

# --- histogram_quantile, worked by hand ------------------------------------------------------

# 20 observations: 10 in (1, 2], 10 in (2, 4].
TWENTY = [(1.0, 0), (2.0, 10), (4.0, 20), (INF, 20)]


@pytest.mark.parametrize(
    ("quantile", "expected"),
    [
        (0.25, 1.5),  # rank 5 of 10 in (1, 2]: 1 + 1 × 5/10
        (0.5, 2.0),  # rank 10: the top of (1, 2]
        (0.75, 3.0),  # rank 15 is 5 of 10 in (2, 4]: 2 + 2 × 5/10
        (0.99, 3.96),  # rank 19.8 is 9.8 of 10 in (2, 4]: 2 + 2 × 0.98
    ],
)
def test_quantile_interpolates_inside_the_bucket_that_holds_the_rank(quantile, expected):
    assert histogram_quantile(quantile, TWENTY) == pytest.approx(expected)


def test_quantile_in_the_first_bucket_starts_from_zero():
    # 4 observations in (0, 10]: rank 2 of 4 → 10 × 2/4.
    assert histogram_quantile(0.5, [(10.0, 4), (INF, 4)]) == pytest.approx(5.0)
    # Envoy's (10, 25] bucket holding every request, as a 20 ms app gives: 10 + 15 × q.
    buckets = [(5.0, 0), (10.0, 0), (25.0, 10), (50.0, 10), (INF, 10)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(17.5)
    assert histogram_quantile(0.99, buckets) == pytest.approx(24.85)


def test_a_rank_in_the_inf_bucket_answers_the_highest_finite_bound():
    # 5 of 10 observations above 2: the 90th percentile is "more than 2", reported as 2.
    assert histogram_quantile(0.9, [(1.0, 5), (2.0, 5), (INF, 10)]) == 2.0


def test_unordered_and_dipping_buckets_are_evened_out_as_prometheus_does():
    # Sorted by bound, and a cumulative count that dips (5 then 4) is read as 5.
    buckets = [(INF, 6), (2.0, 4), (1.0, 5)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.6)  # rank 3 of 5 in (0, 1]


def test_no_estimate_without_observations_or_an_inf_bucket_and_out_of_range_quantiles():
    assert histogram_quantile(0.5, [(1.0, 0), (INF, 0)]) is None
    assert histogram_quantile(0.5, [(1.0, 3), (2.0, 4)]) is None  # no +Inf bucket
    assert histogram_quantile(0.5, [(INF, 3)]) is None  # one bucket: nothing to interpolate
    assert histogram_quantile(-0.1, TWENTY) == -INF
    assert histogram_quantile(1.1, TWENTY) == INF
    assert histogram_quantile(0.0, TWENTY) == 0.0


# --- figures from the sidecars' counters -----------------------------------------------------

REVIEWS = "outbound|9080|v1|reviews.default.svc.cluster.local"
REVIEWS_V2 = "outbound|9080|v2|reviews.default.svc.cluster.local"
ROUTE = "outbound/reviews.default.svc.cluster.local:9080/0"


def exposition(clusters: dict[str, tuple[int, int, list[int]]], route_requests: int = 0) -> str:
    """A sidecar's /stats/prometheus as the engine writes it: per cluster (2xx, 5xx, cumulative
    counts of the buckets 10, 25, 50 ms), and one route's requests and latency."""
    lines = ["# TYPE meshctl_upstream_rs_total counter"]
    for cluster, (ok, failed, buckets) in clusters.items():
        for code_class, count in (("1xx", 0), ("2xx", ok), ("4xx", 0), ("5xx", failed)):
            lines.append(
                f'meshctl_upstream_rs_total{{cluster="{cluster}",code_class="{code_class}"}} {count}'
            )
        for bound, count in zip(("10", "25", "50", "+Inf"), [*buckets, ok + failed], strict=True):
            lines.append(
                f'meshctl_upstream_rq_time_ms_bucket{{cluster="{cluster}",le="{bound}"}} {count}'
            )
        lines.append(f'meshctl_upstream_rq_time_ms_sum{{cluster="{cluster}"}} 12.5')
    lines.append(f'meshctl_route_rq_total{{route="{ROUTE}"}} {route_requests}')
    lines.append('meshctl_route_rq_total{route="reviews-canary"} 4')  # named by its VirtualService
    # The server side's route and cluster: not read.
    lines.append('meshctl_route_rq_total{route="inbound/inbound/0"} 99')
    lines.append(f'meshctl_route_rq_time_ms_bucket{{route="{ROUTE}",le="+Inf"}} {route_requests}')
    lines.append('meshctl_upstream_rs_total{cluster="inbound|9080||",code_class="2xx"} 99')
    return "\n".join(lines) + "\n"


def test_counters_are_read_per_outbound_cluster_and_route_and_inbound_ones_are_left_out():
    counters = parse_counters(exposition({REVIEWS: (7, 3, [1, 9, 10])}, route_requests=10))
    assert set(counters.clusters) == {REVIEWS}
    assert set(counters.routes) == {ROUTE, "reviews-canary"}
    reviews = counters.clusters[REVIEWS]
    assert (reviews.requests, reviews.errors) == (10, 3)
    assert reviews.buckets == {10.0: 1, 25.0: 9, 50.0: 10, INF: 10}
    assert counters.routes[ROUTE].requests == 10


def test_a_service_sums_its_versions_and_callers_and_counts_the_callers_that_sent():
    before = {
        "caller-a": parse_counters(
            exposition({REVIEWS: (10, 0, [10, 10, 10]), REVIEWS_V2: (0, 0, [0, 0, 0])})
        ),
        "caller-b": parse_counters(exposition({REVIEWS: (5, 5, [0, 10, 10])})),
        "idle": parse_counters(exposition({REVIEWS: (1, 0, [1, 1, 1])})),
    }
    after = {
        "caller-a": parse_counters(exposition({REVIEWS: (20, 0, [20, 20, 20]), REVIEWS_V2: (10, 10, [0, 20, 20])})),
        "caller-b": parse_counters(exposition({REVIEWS: (15, 5, [0, 20, 20])})),
        "idle": parse_counters(exposition({REVIEWS: (1, 0, [1, 1, 1])})),
        "new": parse_counters(exposition({REVIEWS: (100, 100, [0, 0, 0])})),  # not read before
    }  # fmt: skip
    window = window_between(before, after, 2.0)
    row = window.services["reviews.default.svc.cluster.local"]
    # a: 10 + 20 more, b: 10 more; "new" has no earlier read to grow from.
    assert (row.traffic.requests, row.traffic.errors, row.sidecars) == (40, 10, 2)
    assert row.rps(window.seconds) == 20.0
    assert row.success_rate() == 0.75
    # 10 answers in (0, 10], 30 in (10, 25]: p50 is rank 20, 10 into (10, 25] → 10 + 15 × 10/30.
    assert row.latency_ms(0.5) == pytest.approx(15.0)


def test_a_restarted_sidecar_counts_from_zero_never_negative():
    before = {"caller": parse_counters(exposition({REVIEWS: (50, 10, [60, 60, 60])}, 60))}
    after = {"caller": parse_counters(exposition({REVIEWS: (4, 1, [5, 5, 5])}, 5))}
    window = window_between(before, after, 1.0)
    row = window.services["reviews.default.svc.cluster.local"]
    assert (row.traffic.requests, row.traffic.errors) == (5, 1)
    assert row.traffic.buckets[10.0] == 5 and row.success_rate() == pytest.approx(0.8)
    assert window.routes[ROUTE].traffic.requests == 5


def test_a_service_without_requests_has_a_row_but_no_rate_or_latency():
    same = {"caller": parse_counters(exposition({REVIEWS: (3, 0, [3, 3, 3])}))}
    row = window_between(same, same, 2.0).services["reviews.default.svc.cluster.local"]
    assert row.rps(2.0) == 0 and row.success_rate() is None and row.latency_ms(0.5) is None
    assert row.sidecars == 0


def test_hosts_name_their_service_and_namespace():
    assert service_of("reviews.bookinfo.svc.cluster.local") == ("bookinfo", "reviews")
    assert service_of("api.example.com") == ("", "api.example.com")
