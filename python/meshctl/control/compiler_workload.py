"""Istio's peer metadata from the registry, for the standard metrics' labels (istio_requests_total ...).

Three places carry it, as Envoy metadata (Envoy keeps metadata it does not use, so a real Envoy
sidecar takes the same config):
- every EDS endpoint of a registry instance: `istio.workload` in Istio's own form
  ("NAME;NAMESPACE;CANONICAL_SERVICE;CANONICAL_REVISION;CLUSTER") and `meshctl.workload` with
  every field (app, version and principal too), which the engine reads for destination_* labels;
- every outbound cluster: `istio.services` ([{host, name, namespace}]), Istio's cluster metadata,
  for destination_service*;
- every listener of a sidecar: `meshctl.istio_stats` with the side it reports as (outbound:
  source, inbound: destination) and the sidecar's own workload, which its outbound requests
  also announce to mTLS peers (the engine's x-meshctl-peer header).
"""

from __future__ import annotations

from typing import Any

from meshctl.control.registry import Sidecar
from meshctl.resources.hosts import CLUSTER_DOMAIN

Json = dict[str, Any]

# Istio's labels that name a workload's canonical service and revision.
CANONICAL_NAME = "service.istio.io/canonical-name"
CANONICAL_REVISION = "service.istio.io/canonical-revision"
CLUSTER_LABEL = "topology.istio.io/cluster"


def workload_fields(sidecar: Sidecar) -> dict[str, str]:
    """The sidecar's workload as Istio's labels name it. Its workload name is SERVICE-VERSION
    (a Kubernetes Deployment's usual name, e.g. reviews-v1), or SERVICE without a version;
    an empty value means unknown to the engine (latest for the canonical revision)."""
    labels = sidecar.all_labels
    return {
        "workload": labels.get("workload") or (f"{sidecar.service}-{sidecar.version}" if sidecar.version else sidecar.service),
        "namespace": sidecar.namespace,
        "principal": sidecar.identity or "",
        "app": labels.get("app", ""),
        "version": labels.get("version", ""),
        "canonical_service": labels.get(CANONICAL_NAME) or labels.get("app", ""),
        "canonical_revision": labels.get(CANONICAL_REVISION) or labels.get("version", ""),
        "cluster": labels.get(CLUSTER_LABEL, ""),
    }


def endpoint_metadata(fields: dict[str, str]) -> Json:
    istio_form = ";".join(
        fields[key] for key in ("workload", "namespace", "canonical_service", "canonical_revision", "cluster")
    )
    return {"filter_metadata": {"istio": {"workload": istio_form}, "meshctl": {"workload": dict(fields)}}}


def service_fields(host: str) -> dict[str, str]:
    """NAME.NAMESPACE.svc.cluster.local → its name and namespace; other hosts (ServiceEntries)
    are their own name, their namespace unknown."""
    suffix = f".{CLUSTER_DOMAIN}"
    if host.endswith(suffix):
        name, _, namespace = host[: -len(suffix)].rpartition(".")
        return {"host": host, "name": name, "namespace": namespace}
    return {"host": host, "name": host, "namespace": ""}


def with_cluster_services(cluster: Json, host: str) -> Json:
    """`cluster` given Istio's `istio.services` metadata for `host` (other metadata kept)."""
    metadata = cluster.setdefault("metadata", {}).setdefault("filter_metadata", {})
    metadata["istio"] = {**metadata.get("istio", {}), "services": [service_fields(host)]}
    return cluster


def with_istio_stats(listener: Json, sidecar: Sidecar, reporter: str) -> Json:
    """A copy of `listener` that reports Istio's metrics as `reporter` (source or destination)."""
    stats: Json = {"reporter": reporter, "workload": workload_fields(sidecar)}
    if sidecar.app_port is not None:
        stats["service"] = service_fields(sidecar.host)
    metadata = listener.get("metadata", {})
    filter_metadata = {**metadata.get("filter_metadata", {})}
    filter_metadata["meshctl"] = {**filter_metadata.get("meshctl", {}), "istio_stats": stats}
    return {**listener, "metadata": {**metadata, "filter_metadata": filter_metadata}}
