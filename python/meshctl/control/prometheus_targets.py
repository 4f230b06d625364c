"""Prometheus scrape targets from the service registry: file_sd target groups and a scrape config.

Each registered sidecar is one target, its metrics endpoint (/stats/prometheus, Istio's path),
labelled as Istio's Prometheus setup labels a pod's Envoy: `namespace`, `pod` (the instance's
name: its node id), and the workload's labels (`app`, `version`, and any the instance registered),
so dashboards and queries written for Istio group by the same names.

Built from registrations as the registry API shows them (Sidecar.as_json), so `meshctl serve`
(its registry) and `meshctl prometheus-config` (GET /v1/sidecars) give the same targets.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

METRICS_PATH = "/stats/prometheus"
SIDECAR_JOB = "meshctl-sidecars"
DEFAULT_SCRAPE_INTERVAL = "15s"  # Prometheus's and Istio's default

# What a Prometheus label name may not hold.
_INVALID_LABEL_CHARACTERS = re.compile(r"[^a-zA-Z0-9_]")


def label_name(name: str) -> str:
    """A workload label's name as Prometheus's Kubernetes discovery spells it (app.kubernetes.io/name
    → app_kubernetes_io_name): every character a label name cannot hold becomes `_`."""
    sanitized = _INVALID_LABEL_CHARACTERS.sub("_", name)
    return f"_{sanitized}" if sanitized[:1].isdigit() else sanitized


def metrics_target(sidecar: Mapping[str, Any]) -> str | None:
    """HOST:PORT of a sidecar's metrics. An agent older than `metricsAddress` registered only its
    admin port, whose endpoint (which serves the metrics) has always listened on loopback."""
    if sidecar.get("metricsAddress"):
        return str(sidecar["metricsAddress"])
    if sidecar.get("adminPort"):
        return f"127.0.0.1:{sidecar['adminPort']}"
    return None


def target_labels(sidecar: Mapping[str, Any]) -> dict[str, str]:
    """The labels a sidecar's series get: its workload labels, then namespace and pod (which a
    workload label of the same name does not override: queries join on them)."""
    labels = {"app": sidecar["service"]}
    if sidecar.get("version"):
        labels["version"] = sidecar["version"]
    labels.update(sidecar.get("labels") or {})
    named = {label_name(name): value for name, value in labels.items()}
    # An empty name would make Prometheus refuse the whole file; __* are Prometheus's own.
    named = {name: value for name, value in named.items() if name and not name.startswith("__")}
    named.update(namespace=sidecar.get("namespace") or "default", pod=sidecar["nodeId"])
    return dict(sorted(named.items()))


def file_sd_groups(sidecars: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Prometheus file_sd target groups, one per sidecar with a metrics endpoint, sorted by node id."""
    groups = []
    for sidecar in sorted(sidecars, key=lambda s: s["nodeId"]):
        target = metrics_target(sidecar)
        if target is not None:
            groups.append({"targets": [target], "labels": target_labels(sidecar)})
    return groups


def scrape_config(
    *,
    groups: list[dict[str, Any]] | None = None,
    file_sd_path: str | None = None,
    scrape_interval: str = DEFAULT_SCRAPE_INTERVAL,
) -> str:
    """A Prometheus config (YAML) with the sidecars' job: its targets listed (`groups`, static) or
    read from a file_sd file that is kept current (`file_sd_path`, re-read as it changes)."""
    job: dict[str, Any] = {"job_name": SIDECAR_JOB, "metrics_path": METRICS_PATH}
    if file_sd_path is not None:
        # Prometheus watches the file; the refresh interval is its fallback if a change is missed.
        job["file_sd_configs"] = [{"files": [file_sd_path], "refresh_interval": "30s"}]
    else:
        job["static_configs"] = groups or []
    config = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "scrape_configs": [job],
    }
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=False)
