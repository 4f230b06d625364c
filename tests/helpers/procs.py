"""Start and stop the subprocesses tests use (upstreams, data planes), always by their own PID."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .ports import port_accepts

SERVERS_DIR = Path(__file__).resolve().parent.parent / "servers"


@dataclass
class Process:
    """A child process with its log file; `stop()` signals only this PID."""

    name: str
    popen: subprocess.Popen
    log_path: Path
    port: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self, limit: int = 6000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return text[-limit:]

    def running(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 5.0) -> int | None:
        """Signal this PID, wait, and SIGKILL the same PID if it does not go."""
        if self.popen.poll() is None:
            try:
                self.popen.send_signal(sig)
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        for stream in (self.popen.stdout, self.popen.stderr):
            if stream:
                stream.close()
        return self.popen.returncode


def start_upstream(script: str, log_dir: Path, *args: str, timeout: float = 15.0) -> Process:
    """Run tests/servers/<script> and wait for its `READY <port>` line."""
    log_path = log_dir / f"{Path(script).stem}-{'-'.join(args).replace('/', '_')}.log"
    log_file = open(log_path, "wb")
    popen = subprocess.Popen(
        [sys.executable, str(SERVERS_DIR / script), *args],
        stdout=subprocess.PIPE,
        stderr=log_file,
        stdin=subprocess.DEVNULL,
    )
    log_file.close()
    process = Process(script, popen, log_path)
    deadline = time.monotonic() + timeout
    line = b""
    while time.monotonic() < deadline and not line.endswith(b"\n"):
        ready, _, _ = select.select([popen.stdout], [], [], 0.1)
        if ready:
            chunk = os.read(popen.stdout.fileno(), 1)
            if not chunk:
                break
            line += chunk
    if not line.startswith(b"READY "):
        process.stop(signal.SIGKILL)
        raise RuntimeError(f"{script} {args} did not start: {line!r}\n{process.log()}")
    process.port = int(line.split()[1])
    return process


def wait_for_ports(process: Process, ports: list[int], timeout: float = 20.0) -> None:
    """Wait until every port accepts a TCP connection, failing early if the process died."""
    deadline = time.monotonic() + timeout
    pending = list(ports)
    while pending:
        if not process.running():
            raise RuntimeError(
                f"{process.name} exited with {process.popen.returncode} before listening on {pending}:\n{process.log()}"
            )
        if time.monotonic() > deadline:
            process.stop(signal.SIGKILL)
            raise RuntimeError(f"{process.name} not listening on {pending} after {timeout}s:\n{process.log()}")
        pending = [port for port in pending if not port_accepts(port)]
        if pending:
            time.sleep(0.05)
