"""One sidecar's Istio standard metrics as the dashboard reads them: request counts and latency
buckets per edge, version, response and security policy, and their growth between two reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from meshctl.cli._sidecar_scrape import samples

REQUESTS = "istio_requests_total"
DURATION_BUCKET = "istio_request_duration_milliseconds_bucket"
UNKNOWN = "unknown"


class SeriesKey(NamedTuple):
    """The labels of istio_requests_total the dashboard uses (the others are summed away)."""

    reporter: str  # source (the caller's sidecar) or destination (the callee's)
    source_namespace: str
    source_service: str  # canonical service, else workload: "unknown" for callers outside the mesh
    destination_namespace: str
    destination_service: str
    destination_version: str
    response_code: str
    response_flags: str
    security_policy: str  # mutual_tls / none on the destination's side; unknown on the source's


def _key(labels: dict[str, str]) -> SeriesKey:
    def known(*names: str) -> str:
        for name in names:
            value = labels.get(name, "")
            if value and value != UNKNOWN:
                return value
        return UNKNOWN

    return SeriesKey(
        reporter=labels.get("reporter", ""),
        source_namespace=known("source_workload_namespace"),
        source_service=known("source_canonical_service", "source_app", "source_workload"),
        destination_namespace=known("destination_service_namespace", "destination_workload_namespace"),
        destination_service=known("destination_service_name", "destination_canonical_service"),
        destination_version=known("destination_version", "destination_canonical_revision"),
        response_code=labels.get("response_code", "0"),
        response_flags=labels.get("response_flags", "-"),
        security_policy=labels.get("connection_security_policy", UNKNOWN),
    )


@dataclass
class SidecarSeries:
    """One read of one sidecar: requests per key, and cumulative latency buckets per key (le → count)."""

    requests: dict[SeriesKey, float] = field(default_factory=dict)
    buckets: dict[SeriesKey, dict[float, float]] = field(default_factory=dict)

    def growth_since(self, old: SidecarSeries | None) -> SidecarSeries:
        """What was counted since `old`. A series that went down, or is new, counts from zero: its
        sidecar restarted, or it expired and came back (Istio's series expire when idle)."""
        old = old or SidecarSeries()
        grown = SidecarSeries()
        for key, count in self.requests.items():
            before = old.requests.get(key, 0.0)
            grown.requests[key] = count - before if count >= before else count
        for key, buckets in self.buckets.items():
            before_buckets = old.buckets.get(key, {})
            reset = any(count < before_buckets.get(le, 0.0) for le, count in buckets.items())
            grown.buckets[key] = {le: count - (0.0 if reset else before_buckets.get(le, 0.0)) for le, count in buckets.items()}
        return grown


def parse_istio_series(text: str) -> SidecarSeries:
    """The istio_requests_total and istio_request_duration_milliseconds buckets of one sidecar's
    /stats/prometheus, summed over the labels SeriesKey leaves out."""
    series = SidecarSeries()
    for metric, labels, value in samples(text):
        if metric == REQUESTS:
            key = _key(labels)
            series.requests[key] = series.requests.get(key, 0.0) + value
        elif metric == DURATION_BUCKET:
            key = _key(labels)
            buckets = series.buckets.setdefault(key, {})
            le = float(labels.get("le", "inf"))
            buckets[le] = buckets.get(le, 0.0) + value
    return series
