"""The mesh as the dashboard draws it: services (from the control plane's registry) and the edges
between them (from the sidecars' Istio metrics over one window), with rps, success rate, p99,
mTLS, the split of each service's requests across its versions, and its failed responses."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from meshctl.cli._quantile import histogram_quantile
from meshctl.dashboard.istio_series import UNKNOWN, SeriesKey, SidecarSeries

Json = dict[str, Any]
MUTUAL_TLS = "mutual_tls"


def node_id(namespace: str, service: str) -> str:
    return f"{namespace}/{service}" if namespace != UNKNOWN else service


def failed(response_code: str) -> bool:
    """A failure as the caller saw it: a 5xx, or no response at all (Istio's code 0). 4xx are
    answers, as in Istio's and Linkerd's success rates."""
    return response_code == "0" or response_code.startswith("5")


@dataclass
class _Edge:
    requests: float = 0.0
    failures: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)
    policies: set[str] = field(default_factory=set)  # as the destination's sidecar saw the calls

    def json(self, source: str, destination: str, seconds: float) -> Json:
        mtls = None  # no destination sidecar reported these calls (a callee outside the mesh)
        if self.policies:
            mtls = MUTUAL_TLS in self.policies and self.policies <= {MUTUAL_TLS, UNKNOWN}
        ordered = sorted(self.buckets.items())
        p99 = histogram_quantile(0.99, ordered) if ordered else None
        p50 = histogram_quantile(0.5, ordered) if ordered else None
        return {
            "source": source,
            "destination": destination,
            "requests": round(self.requests),
            "rps": round(self.requests / seconds, 3) if seconds > 0 else 0.0,
            "successRate": None if self.requests <= 0 else round(1 - self.failures / self.requests, 4),
            "p50Ms": None if p50 is None else round(p50, 3),
            "p99Ms": None if p99 is None else round(p99, 3),
            "mtls": mtls,
        }


def _edge_ends(key: SeriesKey) -> tuple[str, str]:
    return node_id(key.source_namespace, key.source_service), node_id(key.destination_namespace, key.destination_service)


def mesh_graph(registered: Iterable[Mapping[str, Any]], windows: Iterable[SidecarSeries], seconds: float) -> Json:
    """The graph of one window: `registered`, the control plane's sidecars; `windows`, each read
    sidecar's growth over the window's `seconds`. Edges are counted where the caller's sidecar
    reported them (reporter=source: once per request, as its caller saw the answer); calls from
    outside the mesh, which no caller's sidecar saw, as the destination's sidecar reported them."""
    nodes: dict[str, Json] = {}
    for sidecar in registered:
        namespace, service = sidecar.get("namespace", "default"), sidecar["service"]
        node = nodes.setdefault(node_id(namespace, service), {"namespace": namespace, "service": service, "versions": {}})
        version = sidecar.get("version") or ""
        node["versions"][version] = node["versions"].get(version, 0) + 1

    edges: dict[tuple[str, str], _Edge] = {}
    unseen_by_callers: dict[tuple[str, str], _Edge] = {}  # reporter=destination, source unknown
    splits: dict[str, dict[str, float]] = {}
    errors: dict[tuple[str, str, str, str], float] = {}
    for window in windows:
        for key, count in window.requests.items():
            if count <= 0:
                continue
            ends = _edge_ends(key)
            if key.reporter == "source":
                edge = edges.setdefault(ends, _Edge())
                edge.requests += count
                if failed(key.response_code):
                    edge.failures += count
                    error = (ends[1], key.response_code, key.response_flags, ends[0])
                    errors[error] = errors.get(error, 0.0) + count
                versions = splits.setdefault(ends[1], {})
                versions[key.destination_version] = versions.get(key.destination_version, 0.0) + count
            elif key.reporter == "destination":
                edges.setdefault(ends, _Edge()).policies.add(key.security_policy)
                if key.source_service == UNKNOWN:
                    outside = unseen_by_callers.setdefault(ends, _Edge())
                    outside.requests += count
                    outside.failures += count if failed(key.response_code) else 0.0
        for key, buckets in window.buckets.items():
            if key.reporter == "source":
                target = edges
            elif key.reporter == "destination" and key.source_service == UNKNOWN:
                target = unseen_by_callers
            else:
                continue
            edge = target.setdefault(_edge_ends(key), _Edge())
            for le, count in buckets.items():
                edge.buckets[le] = edge.buckets.get(le, 0.0) + count
    for ends, outside in unseen_by_callers.items():
        edge = edges.setdefault(ends, _Edge())
        if edge.requests == 0:  # no caller's sidecar counted these: the destination's count stands
            edge.requests, edge.failures, edge.buckets = outside.requests, outside.failures, outside.buckets

    listed = []
    for (source, destination), edge in sorted(edges.items()):
        if edge.requests <= 0:
            continue
        for end in (source, destination):
            if end not in nodes:  # a caller outside the mesh, or a host no sidecar registered
                namespace, _, service = end.rpartition("/")
                nodes[end] = {"namespace": namespace or UNKNOWN, "service": service, "versions": {}}
        listed.append(edge.json(source, destination, seconds))
    for identity, node in nodes.items():
        incoming = [e for e in listed if e["destination"] == identity]
        requests = sum(e["requests"] for e in incoming)
        failures = sum(e["requests"] * (1 - e["successRate"]) for e in incoming if e["successRate"] is not None)
        node["id"] = identity
        node["rps"] = round(sum(e["rps"] for e in incoming), 3)
        node["successRate"] = None if requests <= 0 else round(1 - failures / requests, 4)
        total = sum(splits.get(identity, {}).values())
        node["split"] = {v: round(c / total, 4) for v, c in sorted(splits.get(identity, {}).items())} if total else {}
    return {
        "seconds": round(seconds, 3),
        "nodes": [nodes[identity] for identity in sorted(nodes)],
        "edges": listed,
        "errors": [
            {"service": service, "responseCode": code, "responseFlags": flags, "source": source, "count": round(count)}
            for (service, code, flags, source), count in sorted(errors.items())
        ],
    }
