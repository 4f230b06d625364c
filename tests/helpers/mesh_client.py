"""The client sidecar of a mesh test on either data plane (`meshctl run`, or a real Envoy fed by the
plane over ADS) behind one face: its outbound port and its per-cluster counters by Envoy's names."""

from __future__ import annotations

import re
from pathlib import Path

from .control_plane import ControlPlane
from .envoy_sidecar import EnvoySidecar, admin_get, start_envoy_sidecar
from .mesh import MeshSidecar


class MeshClient:
    """`kind` is "meshctl" or "envoy"; both are registered with `plane` as `service`."""

    def __init__(self, kind: str, plane: ControlPlane, directory: Path, service: str = "productpage") -> None:
        self.kind = kind
        self.envoy: EnvoySidecar | None = None
        self.sidecar: MeshSidecar | None = None
        if kind == "envoy":
            self.envoy = start_envoy_sidecar(plane, directory, service)
            self.outbound_port, self.admin_port = self.envoy.outbound_port, self.envoy.admin_port
        elif kind == "meshctl":
            self.sidecar = MeshSidecar(plane.env, directory, service)
            self.outbound_port, self.admin_port = self.sidecar.outbound_port, self.sidecar.admin_port
        else:
            raise ValueError(f"unknown data plane {kind!r}")

    def counter(self, cluster: str, name: str) -> int:
        """Envoy's `cluster.<cluster>.<name>`; meshctl spells it meshctl_<name>_total{cluster=...}."""
        if self.envoy is not None:
            return self.envoy.counter(cluster, name)
        return self.meshctl_series(f"meshctl_{name}_total", cluster)

    def meshctl_series(self, metric: str, cluster: str, extra_labels: str = "") -> int:
        """One meshctl series for `cluster` (0 until it exists), e.g. extra_labels ',flag="UT"'."""
        text = admin_get(self.admin_port, "/stats/prometheus")
        series = f'{metric}{{cluster="{cluster}"{extra_labels}}}'
        found = re.search(rf"^{re.escape(series)} (\d+)$", text, re.MULTILINE)
        return int(found.group(1)) if found else 0

    def log(self, tail: int = 3000) -> str:
        text = self.envoy.log() if self.envoy is not None else self.sidecar.log()
        return text[-tail:]

    def stop(self) -> None:
        if self.envoy is not None:
            self.envoy.stop()
        else:
            self.sidecar.stop()
