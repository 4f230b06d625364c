"""Start a real 3-member etcd cluster on loopback (Debian's etcd-server), with temp data dirs and free ports."""

from __future__ import annotations

import base64
import json
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .ports import free_port

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    popen: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL this member's PID (a crash, not a clean leave)."""
        if self.running():
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(timeout=10)

    def stop(self) -> None:
        if self.running():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.popen.kill()  # the same PID
                self.popen.wait(timeout=5)


@dataclass
class EtcdCluster:
    members: list[Member] = field(default_factory=list)

    @property
    def endpoints(self) -> str:
        return ",".join(member.endpoint for member in self.members)

    def url(self, prefix: str = "", order: list[int] | None = None) -> str:
        """etcd://... with the members in `order` (a store tries them in that order)."""
        chosen = [self.members[i] for i in (order or range(len(self.members)))]
        return "etcd://" + ",".join(m.endpoint for m in chosen) + (f"/{prefix}" if prefix else "")

    def call(self, path: str, payload: dict, member: int | None = None) -> dict:
        """One JSON gateway request to the first running member (or the given one)."""
        candidates = [self.members[member]] if member is not None else self.members
        last: Exception | None = None
        for candidate in candidates:
            if not candidate.running():
                continue
            request = urllib.request.Request(
                f"http://{candidate.endpoint}/v3/{path}", json.dumps(payload).encode(),
                headers={"Content-Type": "application/json"},
            )  # fmt: skip
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    return json.loads(response.read())
            except (urllib.error.URLError, OSError) as error:
                last = error
        raise RuntimeError(f"no etcd member answered {path}: {last}")

    def put(self, key: str, value: str) -> int:
        """A raw put (not through meshctl); returns the new revision."""
        answer = self.call("kv/put", {"key": _b64(key), "value": _b64(value)})
        return int(answer["header"]["revision"])

    def compact(self, revision: int) -> None:
        self.call("kv/compaction", {"revision": str(revision), "physical": True})

    def leader(self) -> int:
        """The index of the member that leads now."""
        for index, member in enumerate(self.members):
            if member.running():
                status = self.call("maintenance/status", {}, member=index)
                if status["header"]["member_id"] == status.get("leader"):
                    return index
        raise RuntimeError("no etcd member is the leader")

    def healthy(self, member: Member) -> bool:
        try:
            with urllib.request.urlopen(f"http://{member.endpoint}/health", timeout=1) as response:
                return json.loads(response.read()).get("health") == "true"
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def stop(self) -> None:
        for member in self.members:
            member.stop()

    def logs(self) -> str:
        return "\n".join(
            f"--- {m.name} ---\n{m.log_path.read_text(errors='replace')[-3000:]}"
            for m in self.members
            if m.log_path.exists()
        )


def start_cluster(base_dir: Path, size: int = 3, timeout: float = 20.0) -> EtcdCluster:
    """Start `size` members and wait until every one reports healthy (a leader is elected)."""
    base_dir.mkdir(parents=True, exist_ok=True)
    cluster = EtcdCluster([
        Member(f"m{i}", free_port(), free_port(), base_dir / f"m{i}.data", base_dir / f"m{i}.log")
        for i in range(size)
    ])  # fmt: skip
    initial = ",".join(f"{m.name}=http://127.0.0.1:{m.peer_port}" for m in cluster.members)
    token = f"meshctl-test-{base_dir.name}-{time.monotonic_ns()}"
    for member in cluster.members:
        command = [
            ETCD, "--name", member.name, "--data-dir", str(member.data_dir),
            "--listen-client-urls", f"http://{member.endpoint}",
            "--advertise-client-urls", f"http://{member.endpoint}",
            "--listen-peer-urls", f"http://127.0.0.1:{member.peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{member.peer_port}",
            "--initial-cluster", initial, "--initial-cluster-state", "new",
            "--initial-cluster-token", token,
            # Loopback is fast: short timeouts make a new leader within a second of a kill.
            "--heartbeat-interval", "50", "--election-timeout", "500",
            "--logger", "zap", "--log-level", "warn",
        ]  # fmt: skip
        with open(member.log_path, "wb") as log:
            member.popen = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
    deadline = time.monotonic() + timeout
    try:
        while not all(cluster.healthy(m) for m in cluster.members):
            if time.monotonic() > deadline:
                raise RuntimeError(f"etcd cluster not healthy within {timeout}s\n{cluster.logs()}")
            dead = [m.name for m in cluster.members if not m.running()]
            if dead:
                raise RuntimeError(f"etcd members {dead} exited at start\n{cluster.logs()}")
            time.sleep(0.1)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()
