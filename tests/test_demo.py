"""`meshctl demo`: the whole mesh comes up, the live split follows the shift, and every process
it started is gone when it exits (after --duration, and after a Ctrl-C)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.meshctl_only
REPO = Path(__file__).resolve().parent.parent


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def descendants(root: int) -> set[tuple[int, str]]:
    """(pid, start time) of every process below `root`, so a reused PID is not mistaken."""
    found: set[tuple[int, str]] = set()
    pending = [root]
    while pending:
        pid = pending.pop()
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                children = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                started = _start_time(child)
                if started is not None and (child, started) not in found:
                    found.add((child, started))
                    pending.append(child)
    return found


def run_demo(
    log: Path, *args: str, interrupt_after: str | None = None, timeout: float = 90
) -> tuple[int, str, set]:
    """Run `meshctl demo ARGS`, noting every process under it; optionally SIGINT it (a Ctrl-C)
    once `interrupt_after` shows in its output."""
    with open(log, "wb") as out:
        demo = subprocess.Popen(
            [sys.executable, "-m", "meshctl", "demo", *args],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    seen: set[tuple[int, str]] = set()
    deadline = time.monotonic() + timeout
    try:
        while demo.poll() is None and time.monotonic() < deadline:
            seen |= descendants(demo.pid)
            if interrupt_after and interrupt_after in log.read_text(errors="replace"):
                demo.send_signal(signal.SIGINT)  # this PID only, as a terminal's Ctrl-C would
                interrupt_after = None
            time.sleep(0.2)
    finally:
        if demo.poll() is None:
            demo.send_signal(signal.SIGINT)  # let it clean up, then make sure
            try:
                demo.wait(20)
            except subprocess.TimeoutExpired:
                demo.kill()
                demo.wait()
    return demo.returncode, log.read_text(errors="replace"), seen


def still_running(seen: set[tuple[int, str]], grace: float = 3.0) -> list[str]:
    """Processes of `seen` still alive after `grace` seconds (a SIGKILLed one takes a moment to
    go; a zombie is dead and only waits for its parent)."""
    deadline = time.monotonic() + grace
    while True:
        left = _alive(seen)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def _alive(seen: set[tuple[int, str]]) -> list[str]:
    left = []
    for pid, started in seen:
        if _start_time(pid) == started and _state(pid) not in ("Z", "X", None):
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:120]
            except OSError:
                continue
            left.append(f"{pid}: {command!r}")
    return left


def test_the_demo_shifts_reviews_and_shows_the_live_split(tmp_path: Path):
    status, output, seen = run_demo(tmp_path / "demo.log", "--duration", "12")
    assert status == 0, output
    # control plane, 7 sidecars, 6 apps: all seen while it ran, none left.
    assert len(seen) >= 14, (seen, output)
    assert still_running(seen) == [], output
    assert "step 1/3: reviews → v1=100" in output, output
    assert "step 3/3: reviews → v3=100" in output, output
    live = re.findall(
        r"weights (\S+(?: \S+)?) \| live: v1 +(\d+)% .*v2 +(\d+)% .*v3 +(\d+)%", output
    )
    assert any(w == "v1=100" and v1 == "100" for w, v1, _, _ in live), output
    assert any(w == "v3=100" and v3 == "100" for w, _, _, v3 in live), output
    assert any(w == "v1=50 v3=50" and 0 < int(v1) < 100 for w, v1, _, _ in live), output
    assert re.search(r"traffic: \d+ productpage requests, 0 failed", output), output
    assert "stopped every process" in output, output


def test_ctrl_c_stops_everything_it_started(tmp_path: Path):
    status, output, seen = run_demo(tmp_path / "demo.log", "--no-shift", interrupt_after="live: v1")
    assert "interrupted; stopping" in output, output
    assert status == 0, output
    assert "no shift: reviews → v1=34 v2=33 v3=33" in output, output
    assert len(seen) >= 14, (seen, output)
    assert still_running(seen) == [], output


def _sidecar_of(seen: set[tuple[int, str]], service: str, version: str) -> int | None:
    for pid, started in seen:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if _start_time(pid) == started and b"run" in argv and b"--service" in argv:
            named = argv[argv.index(b"--service") + 1 :]
            if named[:1] == [service.encode()] and version.encode() in argv:
                return pid
    return None


def test_a_sidecar_dying_mid_run_fails_the_demo_naming_it(tmp_path: Path):
    """The demo fails loudly, never with a quiet summary: it names the process that died, shows
    its log's last lines, and exits non-zero."""
    log = tmp_path / "demo.log"
    with open(log, "wb") as out:
        demo = subprocess.Popen(
            [sys.executable, "-m", "meshctl", "demo", "--duration", "60", "--no-shift"],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    seen: set[tuple[int, str]] = set()
    try:
        deadline = time.monotonic() + 90
        while "live: " not in log.read_text(errors="replace") and time.monotonic() < deadline:
            assert demo.poll() is None, log.read_text(errors="replace")
            seen |= descendants(demo.pid)
            time.sleep(0.2)
        seen |= descendants(demo.pid)
        victim = _sidecar_of(seen, "reviews", "v2")
        assert victim is not None, log.read_text(errors="replace")
        os.kill(victim, signal.SIGKILL)
        status = demo.wait(60)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    output = log.read_text(errors="replace")
    assert status == 1, output
    assert "meshctl demo: reviews-v2 exited with status -9; the last lines of" in output, output
    assert "  | " in output, output  # its log's tail, indented under the message
    assert "stopped every process" in output, output
    assert still_running(seen) == [], output
