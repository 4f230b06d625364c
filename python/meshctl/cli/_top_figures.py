"""`meshctl top`'s figures: per service and per route, what the callers' sidecars counted between
two reads of their /stats/prometheus (requests, 5xx answers, latency histogram growth).

The source is the outbound side: each calling sidecar's counters for the destination cluster
(`outbound|PORT|SUBSET|HOST`) it sent requests to, summed over callers and over the host's
ports and subsets. They count one outcome per request as the calling app saw it (a request
retried to success is one success), including answers no server gave (no healthy upstream,
connect failures, timeouts); requests from outside the mesh are not seen. Routes are read from
the same sidecars' outbound route counters.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from meshctl.cli._quantile import histogram_quantile
from meshctl.cli._sidecar_scrape import samples

CLUSTER_DOMAIN_SUFFIX = ".svc.cluster.local"
# Unnamed routes are counted as ROUTE_TABLE/VIRTUAL_HOST/INDEX: the outbound table's as
# outbound/HOST:PORT/INDEX, the inbound one's (the server side) as inbound/inbound/INDEX. A route
# a VirtualService names is counted by that name, and only outbound tables hold those.
OUTBOUND_ROUTE_PREFIX = "outbound/"
INBOUND_ROUTE_PREFIX = "inbound/"


@dataclass
class Traffic:
    """Counters of one destination cluster or route in one sidecar (or their growth)."""

    requests: float = 0.0
    errors: float = 0.0  # answered 5xx; routes do not count response classes (always 0)
    buckets: dict[float, float] = field(default_factory=dict)  # upper bound (ms) → cumulative

    def growth_since(self, old: Traffic) -> Traffic:
        """The growth since `old`; a counter that went down means the sidecar restarted (its
        counters began again from 0), so everything counted now is new."""
        if (
            self.requests < old.requests
            or self.errors < old.errors
            or any(count < old.buckets.get(bound, 0.0) for bound, count in self.buckets.items())
        ):
            old = Traffic()
        return Traffic(
            self.requests - old.requests,
            self.errors - old.errors,
            {bound: count - old.buckets.get(bound, 0.0) for bound, count in self.buckets.items()},
        )

    def add(self, other: Traffic) -> None:
        self.requests += other.requests
        self.errors += other.errors
        for bound, count in other.buckets.items():
            self.buckets[bound] = self.buckets.get(bound, 0.0) + count


@dataclass
class SidecarCounters:
    """One sidecar's outbound counters: by destination cluster and by route."""

    clusters: dict[str, Traffic] = field(default_factory=dict)
    routes: dict[str, Traffic] = field(default_factory=dict)


def parse_counters(text: str) -> SidecarCounters:
    """The outbound clusters' and routes' counters in one sidecar's /stats/prometheus."""
    counters = SidecarCounters()
    for metric, labels, value in samples(text):
        cluster = labels.get("cluster", "")
        route = labels.get("route", "")
        if metric == "meshctl_upstream_rs_total" and cluster.startswith("outbound|"):
            # One response per request, after retries: the outcome the calling app saw.
            traffic = counters.clusters.setdefault(cluster, Traffic())
            traffic.requests += value
            if labels.get("code_class") == "5xx":
                traffic.errors += value
        elif metric == "meshctl_upstream_rq_time_ms_bucket" and cluster.startswith("outbound|"):
            traffic = counters.clusters.setdefault(cluster, Traffic())
            traffic.buckets[float(labels["le"])] = value
        elif not route or route.startswith(INBOUND_ROUTE_PREFIX):
            continue
        elif metric == "meshctl_route_rq_total":
            counters.routes.setdefault(route, Traffic()).requests = value
        elif metric == "meshctl_route_rq_time_ms_bucket":
            counters.routes.setdefault(route, Traffic()).buckets[float(labels["le"])] = value
    return counters


def service_of(host: str) -> tuple[str, str]:
    """(namespace, service) of a mesh host NAME.NS.svc.cluster.local; ('', host) for any other
    host (a ServiceEntry's)."""
    if host.endswith(CLUSTER_DOMAIN_SUFFIX):
        name, _, namespace = host[: -len(CLUSTER_DOMAIN_SUFFIX)].rpartition(".")
        if name:
            return namespace, name
    return "", host


def route_host(route: str) -> str:
    """The host of an outbound route's stat name, outbound/HOST:PORT/INDEX."""
    virtual_host = route[len(OUTBOUND_ROUTE_PREFIX) :].rsplit("/", 1)[0]
    return virtual_host.rsplit(":", 1)[0]


@dataclass
class Row:
    """One service's or route's figures over a window, summed over the sidecars that reported."""

    traffic: Traffic = field(default_factory=Traffic)
    sidecars: int = 0  # calling sidecars whose counters grew in the window

    def rps(self, seconds: float) -> float:
        return self.traffic.requests / seconds if seconds > 0 else 0.0

    def success_rate(self) -> float | None:
        """The share of requests not answered 5xx; None without requests."""
        if self.traffic.requests <= 0:
            return None
        return 1.0 - self.traffic.errors / self.traffic.requests

    def latency_ms(self, quantile: float) -> float | None:
        buckets = list(self.traffic.buckets.items())
        if not buckets or not any(math.isinf(bound) for bound, _ in buckets):
            return None
        return histogram_quantile(quantile, buckets)


@dataclass
class Window:
    """Per service host and per route: the figures between two reads of the same sidecars."""

    seconds: float
    services: dict[str, Row] = field(default_factory=dict)
    routes: dict[str, Row] = field(default_factory=dict)


def window_between(
    before: Mapping[str, SidecarCounters], after: Mapping[str, SidecarCounters], seconds: float
) -> Window:
    """Growth of every sidecar read both times; every destination host any of them knows gets a
    row, with or without requests (as Linkerd's stat lists idle deployments)."""
    window = Window(seconds)
    for node, now in after.items():
        earlier = before.get(node)
        if earlier is None:  # not read the first time: its growth is unknown
            continue
        _collect(window.services, now.clusters, earlier.clusters, lambda c: c.split("|", 3)[3])
        _collect(window.routes, now.routes, earlier.routes, lambda r: r)
    return window


def _collect(rows: dict[str, Row], now: Mapping[str, Traffic], earlier: Mapping[str, Traffic],
             key_of) -> None:  # fmt: skip
    grown_by_key: dict[str, Traffic] = {}
    for name, traffic in now.items():
        grown = traffic.growth_since(earlier.get(name, Traffic()))
        grown_by_key.setdefault(key_of(name), Traffic()).add(grown)
    for key, grown in grown_by_key.items():
        row = rows.setdefault(key, Row())
        row.traffic.add(grown)
        if grown.requests > 0:
            row.sidecars += 1


def known_services(counters: Iterable[SidecarCounters]) -> set[tuple[str, str]]:
    """(namespace, service) of every destination host the sidecars have a cluster for."""
    return {
        service_of(cluster.split("|", 3)[3]) for sidecar in counters for cluster in sidecar.clusters
    }
