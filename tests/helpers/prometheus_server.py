"""Start a real Prometheus (Debian's prometheus) on a free loopback port with a given config, its
TSDB in a temp dir, and ask its HTTP API (/api/v1/query, /api/v1/targets)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .ports import free_port

PROMETHEUS = shutil.which("prometheus")


@dataclass
class PrometheusServer:
    popen: subprocess.Popen
    port: int
    log_path: Path

    def running(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def api(self, path: str, **params: str) -> Any:
        """The `data` of a successful API answer; AssertionError with Prometheus's error otherwise."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}{query}", timeout=5) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as error:
            answer = json.loads(error.read() or b"{}")
        assert answer.get("status") == "success", answer
        return answer["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's vector: [{"metric": {labels}, "value": [time, "number"]}, ...]."""
        data = self.api("/api/v1/query", query=promql)
        assert data["resultType"] == "vector", data
        return data["result"]

    def active_targets(self) -> list[dict[str, Any]]:
        return self.api("/api/v1/targets", state="active")["activeTargets"]

    def stop(self) -> None:
        if self.running():
            self.popen.send_signal(signal.SIGTERM)  # only this PID
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=5)


def start_prometheus(base_dir: Path, config: str, timeout: float = 20.0) -> PrometheusServer:
    """Prometheus running `config` (YAML text), ready (/-/ready answers 200) on a free loopback port."""
    assert PROMETHEUS is not None, "prometheus not installed (Debian prometheus; scripts/test.sh installs it)"
    base_dir.mkdir(parents=True, exist_ok=True)
    config_path = base_dir / "prometheus.yml"
    config_path.write_text(config)
    port = free_port()
    log_path = base_dir / "prometheus.log"
    command = [
        PROMETHEUS, f"--config.file={config_path}", f"--storage.tsdb.path={base_dir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}", "--log.level=info",
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        server = PrometheusServer(
            subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT), port, log_path
        )  # fmt: skip
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.running():
            raise RuntimeError(f"prometheus exited with {server.popen.returncode}:\n{server.log()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=1) as response:
                if response.status == 200:
                    return server
        except (OSError, urllib.error.HTTPError):
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"prometheus not ready on {port} after {timeout}s:\n{server.log()}")
