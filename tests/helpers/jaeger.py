"""A real Jaeger (v1.75's `cmd/jaeger`: the OpenTelemetry-collector-based v2 binary) on free loopback
ports: OTLP/gRPC in, in-memory storage, the query API out. Built once by scripts/build-jaeger.sh."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from .ports import free_port

ROOT = Path(__file__).resolve().parents[2]


def jaeger_binary() -> str:
    """The cached binary (built on first use: minutes, once per machine and version)."""
    built = subprocess.run(["bash", str(ROOT / "scripts" / "build-jaeger.sh")], capture_output=True, text=True,
                           timeout=1800, check=False)  # fmt: skip
    assert built.returncode == 0, f"scripts/build-jaeger.sh failed:\n{built.stderr[-3000:]}"
    return built.stdout.strip().splitlines()[-1]


# Every port Jaeger's defaults would take (4317, 4318, 16686, 16685, 13133, 8888) is set here.
CONFIG = """\
service:
  extensions: [jaeger_storage, jaeger_query, healthcheckv2]
  pipelines:
    traces:
      receivers: [otlp]
      processors: []
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
    traces:
      level: none
    logs:
      level: warn
extensions:
  healthcheckv2:
    use_v2: true
    http:
      endpoint: 127.0.0.1:{health}
  jaeger_query:
    storage:
      traces: memstore
    http:
      endpoint: 127.0.0.1:{query}
    grpc:
      endpoint: 127.0.0.1:{query_grpc}
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: 10000
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:{otlp}
exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
"""


class Jaeger:
    def __init__(self, directory: Path) -> None:
        self.otlp_port, self.query_port = free_port(), free_port()
        directory.mkdir(parents=True, exist_ok=True)
        config = directory / "jaeger.yaml"
        config.write_text(CONFIG.format(health=free_port(), query=self.query_port, query_grpc=free_port(), otlp=self.otlp_port))
        self.log_path = directory / "jaeger.log"
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen([jaeger_binary(), "--config", str(config)], stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            try:
                self.get("/api/services")
                return
            except (OSError, ValueError):
                if self.popen.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"jaeger did not start:\n{self.log_path.read_text(errors='replace')[-4000:]}") from None
                time.sleep(0.2)

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.query_port}{path}", timeout=5) as response:
            return json.loads(response.read())

    def traces(self, service: str, tags: dict[str, str] | None = None) -> list[dict]:
        """Jaeger's query API: the traces with spans of `service` (and these span tags)."""
        query = {"service": service, "limit": "100", "lookback": "1h"}
        if tags:
            query["tags"] = json.dumps(tags)
        return self.get(f"/api/traces?{urllib.parse.urlencode(query)}")["data"]

    def trace(self, trace_id: str) -> list[dict]:
        try:
            return self.get(f"/api/traces/{trace_id}")["data"]
        except urllib.error.HTTPError as error:
            if error.code == 404:
                return []
            raise

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()  # this PID only
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
