"""`envoy --mode validate` of a bootstrap made from compiled xDS: Envoy 1.40 must accept what the compiler emits."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

ENVOY = shutil.which("envoy")


def static_cluster(cluster: dict) -> dict:
    """An EDS cluster as a STATIC one with no endpoints (validation does not connect to xDS)."""
    cluster = dict(cluster)
    if "eds_cluster_config" in cluster:
        del cluster["eds_cluster_config"]
        cluster["type"] = "STATIC"
        cluster["load_assignment"] = {"cluster_name": cluster["name"]}
    return cluster


def assert_envoy_accepts(bootstrap: dict, tmp_path: Path) -> None:
    """Envoy validates the bootstrap: exit 0 and "OK", else the test fails with Envoy's output."""
    path = tmp_path / "bootstrap.json"
    path.write_text(json.dumps(bootstrap))
    result = subprocess.run([ENVOY, "--mode", "validate", "-c", str(path), "--log-level", "warn"],
                            capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "OK" in output, output
