"""DestinationRule: the subsets of a host (by labels) and how traffic is balanced across them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from meshctl.resources.common import LabelName, MeshModel
from meshctl.resources.support import NOT_ENFORCED, UNSUPPORTED

Later = Annotated[Any, UNSUPPORTED]
# Resilience settings arrive with their own issue; until then they are kept as written.
KeptForLater = Annotated[dict[str, Any] | None, NOT_ENFORCED]


class LoadBalancer(MeshModel):
    simple: Literal["ROUND_ROBIN", "LEAST_REQUEST", "RANDOM"] | None = None
    consistent_hash: Later = None
    locality_lb_setting: Later = None
    warmup_duration_secs: Later = None
    warmup: Later = None


class TrafficPolicy(MeshModel):
    load_balancer: LoadBalancer | None = None
    connection_pool: KeptForLater = None
    outlier_detection: KeptForLater = None
    tls: Later = None
    port_level_settings: Later = None
    tunnel: Later = None
    proxy_protocol: Later = None
    retry_budget: Later = None


class Subset(MeshModel):
    # Subset names become part of cluster names, so they stay DNS labels as in Istio.
    name: LabelName
    labels: dict[str, str] | None = None
    traffic_policy: TrafficPolicy | None = None


class DestinationRuleSpec(MeshModel):
    host: str = Field(min_length=1)
    traffic_policy: TrafficPolicy | None = None
    subsets: list[Subset] | None = None
    export_to: Later = None
    workload_selector: Later = None
