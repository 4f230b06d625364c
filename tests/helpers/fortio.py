"""Run `fortio load` (Istio's load tool in its tasks) through a data plane and read its JSON result."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


def fortio_binary() -> str:
    """fortio on PATH, else where `go install fortio.org/fortio@latest` puts it (scripts/test.sh)."""
    found = shutil.which("fortio")
    if found:
        return found
    gopath = os.environ.get("GOPATH") or str(Path.home() / "go")
    candidate = Path(gopath) / "bin" / "fortio"
    if candidate.exists():
        return str(candidate)
    raise RuntimeError("fortio not found: go install fortio.org/fortio@latest (scripts/test.sh does)")


@dataclass
class FortioResult:
    codes: dict[int, int]  # HTTP status → how many requests got it (-1: a socket error)
    slowest_error: float  # seconds, the slowest non-2xx answer (0 without any)
    slowest: float  # seconds, the slowest answer of all
    actual_qps: float

    @property
    def total(self) -> int:
        return sum(self.codes.values())

    def __str__(self) -> str:
        codes = ", ".join(f"{code}: {count}" for code, count in sorted(self.codes.items()))
        return (f"{self.total} calls ({codes}), slowest {self.slowest * 1000:.0f} ms, slowest error "
                f"{self.slowest_error * 1000:.0f} ms, {self.actual_qps:.0f} qps")  # fmt: skip


def fortio_load(port: int, host: str, path: str, connections: int, requests: int, timeout: float = 60) -> FortioResult:
    """`fortio load -c C -qps 0 -n N` of http://<host><path> sent to a sidecar's outbound port
    (the Host header names the service, as an app's request to http://httpbin:8000/get does)."""
    command = [
        fortio_binary(), "load", "-c", str(connections), "-qps", "0", "-n", str(requests),
        "-loglevel", "Warning", "-json", "-", "-H", f"Host: {host}", f"http://127.0.0.1:{port}{path}",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"{command} exited {done.returncode}:\n{done.stderr[-3000:]}"
    result = json.loads(done.stdout)
    return FortioResult(
        codes={int(code): count for code, count in result["RetCodes"].items()},
        slowest_error=result["ErrorsDurationHistogram"]["Max"] if result["ErrorsDurationHistogram"]["Count"] else 0.0,
        slowest=result["DurationHistogram"]["Max"],
        actual_qps=result["ActualQPS"],
    )
