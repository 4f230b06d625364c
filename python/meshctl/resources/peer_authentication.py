"""PeerAuthentication: whether a workload's sidecar accepts mutual TLS, plaintext, or both (Istio's modes)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Literal

from pydantic import Field, Strict

from meshctl.resources.common import MeshModel
from meshctl.resources.security_common import WorkloadSelector, has_selector

# UNSET inherits from the wider policy (workload → namespace → mesh); with nothing set: PERMISSIVE.
MtlsMode = Literal["UNSET", "DISABLE", "PERMISSIVE", "STRICT"]
# Map keys are strings in JSON (a stored body, kubectl) and integers in hand-written YAML: both.
WorkloadPort = Annotated[int, Strict(False), Field(ge=1, le=65535)]


class MutualTls(MeshModel):
    mode: MtlsMode = "UNSET"


class PeerAuthenticationSpec(MeshModel):
    selector: WorkloadSelector | None = None
    mtls: MutualTls | None = None
    # Keyed by the workload's own port (the app port), as in Istio.
    port_level_mtls: dict[WorkloadPort, MutualTls] | None = None


def problems(spec: PeerAuthenticationSpec) -> Iterator[tuple[str, str]]:
    if spec.port_level_mtls and not has_selector(spec.selector):
        reason = (
            "needs a selector: a namespace- or mesh-wide PeerAuthentication cannot set port-level "
            "mTLS (Istio refuses it too)"
        )
        yield "spec.portLevelMtls", reason
