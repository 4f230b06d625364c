"""Start a real redis-server (Debian's redis-server) on a free loopback port, in a temp dir, without persistence."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .ports import free_port

REDIS_SERVER = shutil.which("redis-server")


@dataclass
class RedisServer:
    popen: subprocess.Popen
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def running(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.running():
            self.popen.send_signal(signal.SIGTERM)  # only this PID
            try:
                self.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=5)


def start_redis(base_dir: Path, port: int | None = None, timeout: float = 10.0) -> RedisServer:
    """A redis-server answering PING on `port` (else a free one); its files under `base_dir`."""
    assert REDIS_SERVER is not None, "redis-server not installed (Debian redis-server)"
    base_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log_path = base_dir / "redis.log"
    command = [
        REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(base_dir),
        "--save", "", "--appendonly", "no", "--daemonize", "no", "--logfile", str(log_path),
    ]  # fmt: skip
    server = RedisServer(subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.STDOUT), port, log_path)  # fmt: skip
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.running():
            raise RuntimeError(f"redis-server exited with {server.popen.returncode}:\n{server.log()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as connection:
                connection.sendall(b"PING\r\n")
                if connection.recv(64).startswith(b"+PONG"):
                    return server
        except OSError:
            pass
        time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"redis-server not answering on {port} after {timeout}s:\n{server.log()}")
