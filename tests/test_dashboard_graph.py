"""The dashboard's graph from Istio metrics text as sidecars expose it: edges counted once (by the
caller's sidecar), mTLS as the callee's sidecar saw it, splits per version, failures, resets."""

from __future__ import annotations

from meshctl.dashboard.graph import mesh_graph
from meshctl.dashboard.istio_series import parse_istio_series

LABELS = (
    'reporter="{reporter}",source_workload="{src}-v1",source_canonical_service="{src}",'
    'source_workload_namespace="default",destination_workload="{dst}-{ver}",'
    'destination_service_name="{dst}",destination_service_namespace="default",destination_version="{ver}",'
    'request_protocol="http",response_code="{code}",grpc_response_status="",response_flags="{flags}",'
    'connection_security_policy="{policy}"'
)


def text(*series: tuple) -> str:
    """Prometheus text of istio_requests_total and duration buckets (everything in the 5 ms bucket)."""
    lines = []
    for reporter, src, dst, ver, code, flags, policy, count in series:
        labels = LABELS.format(reporter=reporter, src=src, dst=dst, ver=ver, code=code, flags=flags, policy=policy)
        if src == "unknown":  # a caller outside the mesh: Istio says unknown for every source label
            labels = labels.replace('"unknown-v1"', '"unknown"').replace('source_workload_namespace="default"', 'source_workload_namespace="unknown"')
        lines.append(f"istio_requests_total{{{labels}}} {count}")
        for le, cumulative in (("1", 0), ("5", count), ("+Inf", count)):
            lines.append(f'istio_request_duration_milliseconds_bucket{{{labels},le="{le}"}} {cumulative}')
    return "\n".join(lines) + "\n"


REGISTRY = [
    {"nodeId": "productpage-1", "service": "productpage", "namespace": "default", "version": "v1"},
    {"nodeId": "reviews-1", "service": "reviews", "namespace": "default", "version": "v1"},
    {"nodeId": "reviews-2", "service": "reviews", "namespace": "default", "version": "v2"},
]


def window(before: str, after: str):
    return parse_istio_series(after).growth_since(parse_istio_series(before))


def test_edges_are_counted_by_the_caller_and_secured_as_the_callee_saw_them() -> None:
    caller_before = text(("source", "productpage", "reviews", "v1", "200", "-", "unknown", 10))
    caller_after = text(
        ("source", "productpage", "reviews", "v1", "200", "-", "unknown", 40),
        ("source", "productpage", "reviews", "v2", "200", "-", "unknown", 20),
        ("source", "productpage", "reviews", "v2", "503", "UH", "unknown", 2),
    )
    callee_before = text(("destination", "productpage", "reviews", "v1", "200", "-", "mutual_tls", 10))
    callee_after = text(("destination", "productpage", "reviews", "v1", "200", "-", "mutual_tls", 40))
    graph = mesh_graph(REGISTRY, [window(caller_before, caller_after), window(callee_before, callee_after)], 2.0)

    [edge] = graph["edges"]
    assert (edge["source"], edge["destination"]) == ("default/productpage", "default/reviews")
    # 30 + 20 + 2 new requests from the caller's view; the callee's 30 are not counted again.
    assert edge["requests"] == 52 and edge["rps"] == 26.0
    assert edge["successRate"] == round(1 - 2 / 52, 4)
    assert edge["mtls"] is True
    assert 1 < edge["p99Ms"] <= 5
    reviews = next(n for n in graph["nodes"] if n["id"] == "default/reviews")
    assert reviews["versions"] == {"v1": 1, "v2": 1}
    assert reviews["split"] == {"v1": round(30 / 52, 4), "v2": round(22 / 52, 4)}
    assert graph["errors"] == [
        {"service": "default/reviews", "responseCode": "503", "responseFlags": "UH", "source": "default/productpage", "count": 2}
    ]


def test_plaintext_and_unreported_edges() -> None:
    caller = text(
        ("source", "productpage", "reviews", "v1", "200", "-", "unknown", 5),
        ("source", "productpage", "details", "v1", "200", "-", "unknown", 5),
    )
    callee = text(("destination", "productpage", "reviews", "v1", "200", "-", "none", 5))
    graph = mesh_graph(REGISTRY, [window("", caller), window("", callee)], 1.0)
    by_destination = {e["destination"]: e for e in graph["edges"]}
    assert by_destination["default/reviews"]["mtls"] is False
    assert by_destination["default/details"]["mtls"] is None  # no sidecar of details reported
    # details is not registered: a node all the same, with no versions.
    assert any(n["id"] == "default/details" and n["versions"] == {} for n in graph["nodes"])


def test_callers_outside_the_mesh_count_as_the_callee_saw_them() -> None:
    callee = text(("destination", "unknown", "productpage", "v1", "200", "-", "none", 8))
    graph = mesh_graph(REGISTRY, [window("", callee)], 2.0)
    [edge] = graph["edges"]
    assert edge["source"] == "unknown" and edge["requests"] == 8 and edge["rps"] == 4.0


def test_a_restarted_sidecar_counts_from_zero_not_negative() -> None:
    before = text(("source", "productpage", "reviews", "v1", "200", "-", "unknown", 100))
    after = text(("source", "productpage", "reviews", "v1", "200", "-", "unknown", 7))
    graph = mesh_graph(REGISTRY, [window(before, after)], 1.0)
    [edge] = graph["edges"]
    assert edge["requests"] == 7


def test_no_traffic_no_edges_but_registered_services_are_nodes() -> None:
    same = text(("source", "productpage", "reviews", "v1", "200", "-", "unknown", 3))
    graph = mesh_graph(REGISTRY, [window(same, same)], 2.0)
    assert graph["edges"] == []
    assert {n["id"] for n in graph["nodes"]} == {"default/productpage", "default/reviews"}
    assert all(n["split"] == {} and n["successRate"] is None for n in graph["nodes"])
