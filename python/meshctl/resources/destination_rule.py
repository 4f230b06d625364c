"""DestinationRule: the subsets of a host (by labels) and the traffic policy for each (see
traffic_policy.py)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from meshctl.resources.common import LabelName, MeshModel
from meshctl.resources.support import UNSUPPORTED
from meshctl.resources.traffic_policy import TrafficPolicy

Later = Annotated[Any, UNSUPPORTED]


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
