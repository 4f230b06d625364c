"""ServiceEntry and WorkloadEntry: services and instances the mesh learns from config, not the registry."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from meshctl.resources.common import MeshModel, Port, WorkloadSelector
from meshctl.resources.support import NOT_ENFORCED, UNSUPPORTED

Later = Annotated[Any, UNSUPPORTED]


class WorkloadEntrySpec(MeshModel):
    """One instance: also the shape of a ServiceEntry's inline endpoints."""

    address: str = Field(min_length=1)
    ports: dict[str, Port] | None = None
    labels: dict[str, str] | None = None
    weight: Annotated[int, Field(ge=0)] | None = None
    locality: Annotated[str | None, NOT_ENFORCED] = None
    service_account: Annotated[str | None, NOT_ENFORCED] = None
    network: Later = None


class ServicePort(MeshModel):
    number: Port
    protocol: Literal["HTTP", "HTTP2", "GRPC", "HTTPS", "TCP", "TLS"] | None = None
    name: str | None = None
    target_port: Port | None = None


class ServiceEntrySpec(MeshModel):
    hosts: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1)
    addresses: list[str] | None = None
    ports: list[ServicePort] | None = None
    location: Literal["MESH_EXTERNAL", "MESH_INTERNAL"] | None = None
    resolution: Literal["NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN"] | None = None
    endpoints: list[WorkloadEntrySpec] | None = None
    workload_selector: WorkloadSelector | None = None
    subject_alt_names: Annotated[list[str] | None, NOT_ENFORCED] = None
    export_to: Later = None
