"""Start a real `meshctl serve` on a free port with a temporary store, and run meshctl commands against it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path


@dataclass
class ControlPlane:
    popen: subprocess.Popen
    data_dir: Path  # XDG_DATA_HOME for the server and the CLI: token and store live under it
    address: str
    log_path: Path

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "XDG_DATA_HOME": str(self.data_dir),
            "MESHCTL_CONTROL_PLANE": self.address,
        }

    @property
    def token_path(self) -> Path:
        return self.data_dir / "meshctl" / "api-token"

    @property
    def store_path(self) -> Path:
        return self.data_dir / "meshctl" / "store.db"

    def meshctl(
        self, *args: str, stdin: str | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "meshctl", *args],
            input=stdin,
            capture_output=True,
            check=False,
            text=True,
            env=env or self.env,
            timeout=30,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def xds_address(self) -> str:
        """HOST:PORT of the TLS xDS + CA port, from the ready line."""
        found = re.search(r"xDS \(ADS, TLS[^)]*\) on ([\d.]+:\d+)", self.log())
        assert found, self.log()
        return found.group(1)

    def api(self, method: str, path: str, body: dict | None = None) -> dict:
        """One REST call with the API token; the decoded JSON answer."""
        request = urllib.request.Request(
            f"http://{self.address}{path}", method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"Bearer {self.token_path.read_text().strip()}",
                     "Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def join_token(self, service_account: str, namespace: str = "default", ttl_seconds: int = 600) -> str:
        body = {"serviceAccount": service_account, "namespace": namespace, "ttlSeconds": ttl_seconds}
        return self.api("POST", "/v1/identity/tokens", body)["token"]

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)  # only this PID
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def start_control_plane(data_dir: Path, *extra: str, timeout: float = 20.0) -> ControlPlane:
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / "serve.log"
    env = {**os.environ, "XDG_DATA_HOME": str(data_dir)}
    # Never the default 15012: tests (and anyone on this machine) may run several planes at once.
    xds_port = () if "--xds-port" in extra else ("--xds-port", "0")
    with open(log_path, "wb") as log:
        # A file, not a pipe: the access log would fill a pipe nobody reads and stall the server.
        popen = subprocess.Popen(
            [sys.executable, "-m", "meshctl", "serve", "--api-port", "0", *xds_port, *extra],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        )  # fmt: skip
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        found = re.search(r"ready: API on http://([\d.]+:\d+)", text)
        if found:
            return ControlPlane(popen, data_dir, found.group(1), log_path)
        if popen.poll() is not None:
            raise RuntimeError(f"meshctl serve exited with {popen.returncode}:\n{text}")
        time.sleep(0.05)
    popen.kill()
    popen.wait()
    raise RuntimeError(f"meshctl serve not ready after {timeout}s:\n{log_path.read_text()}")
