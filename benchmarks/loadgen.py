"""Runs wrk, h2load and fortio pinned to the load-generator core and parses what they print."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.peers import LOADGEN_CPU, pinned

# `go install` drops fortio in GOPATH/bin, which a fresh shell may not have on PATH.
GO_BIN = Path(os.environ.get("GOPATH", Path.home() / "go")) / "bin"


class LoadFailed(RuntimeError):
    """The load generator could not run, or printed something we cannot parse."""


@dataclass
class LoadResult:
    """One measured run: throughput, correctness counters and, for open-loop runs, latency."""

    tool: str
    command: str
    requests: int
    seconds: float
    requests_per_second: float
    non_2xx: int
    socket_errors: int
    latency_us: dict[str, float] = field(default_factory=dict)  # "p50" -> microseconds
    details: dict[str, int | float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def find_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidate = GO_BIN / name
    return str(candidate) if candidate.is_file() else None


def _run(command: list[str], timeout: float) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(
            pinned(LOADGEN_CPU, command),
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as error:
        raise LoadFailed(f"{command[0]} did not finish within {timeout:.0f}s") from error
    if result.returncode != 0:
        raise LoadFailed(
            f"{' '.join(command)} exited {result.returncode}: {result.stderr.strip()[-400:]}"
        )
    return result


def _number(pattern: str, text: str, default: float | None = None) -> float:
    match = re.search(pattern, text)
    if match:
        return float(match.group(1))
    if default is None:
        raise LoadFailed(f"pattern {pattern!r} not found in:\n{text[-800:]}")
    return default


def wrk(url: str, *, connections: int = 64, threads: int = 1, seconds: float = 10) -> LoadResult:
    """Closed-loop HTTP/1.1 keep-alive throughput."""
    command = [
        find_tool("wrk") or "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds:g}s",
        url,
    ]
    out = _run(command, timeout=seconds + 30).stdout
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    kinds = (
        dict(zip(("connect", "read", "write", "timeout"), map(int, errors.groups())))
        if errors
        else {}
    )
    return LoadResult(
        tool="wrk",
        command=" ".join(command),
        requests=int(_number(r"(\d+) requests in", out)),
        seconds=seconds,
        requests_per_second=_number(r"Requests/sec:\s+([\d.]+)", out),
        # wrk only counts statuses >= 400 here; the upstream sends no 1xx/3xx, so this is non-2xx.
        non_2xx=int(_number(r"Non-2xx or 3xx responses: (\d+)", out, 0)),
        socket_errors=sum(kinds.values()),
        details={f"socket_{kind}": count for kind, count in kinds.items()},
    )


def h2load(url: str, *, clients: int = 16, streams: int = 10, seconds: float = 10) -> LoadResult:
    """Closed-loop HTTP/2 throughput; an http:// URL means h2c with prior knowledge."""
    command = [
        find_tool("h2load") or "h2load",
        "-t1",
        f"-c{clients}",
        f"-m{streams}",
        "-D",
        f"{seconds:g}",
        url,
    ]
    result = _run(command, timeout=seconds + 30)
    out = result.stdout
    status = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if not status:
        raise LoadFailed(f"h2load printed no status codes:\n{out[-800:]}\n{result.stderr[-400:]}")
    errored = int(_number(r"(\d+) errored", out))
    timeouts = int(_number(r"(\d+) timeout", out))
    # Clients that never connect start no request, so they only show up on stderr.
    connect_failures = result.stderr.count("could not connect") + out.count("could not connect")
    return LoadResult(
        tool="h2load",
        command=" ".join(command),
        requests=int(_number(r"requests: (\d+) total", out)),
        seconds=seconds,
        requests_per_second=_number(r"finished in [\d.]+\w+, ([\d.]+) req/s", out),
        non_2xx=sum(int(n) for n in status.groups()[1:]),
        socket_errors=errored + timeouts + connect_failures,
        details={"errored": errored, "timeout": timeouts, "connect_failures": connect_failures},
    )


def fortio(
    url: str, *, qps: int = 2000, connections: int = 16, seconds: float = 10, host: str | None = None
) -> LoadResult:
    """Open-loop HTTP/1.1 latency at a fixed request rate (p50/p90/p99); `host` sets the Host header."""
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "fortio.json"
        command = [
            find_tool("fortio") or "fortio",
            "load",
            "-quiet",
            "-qps",
            str(qps),
            "-c",
            str(connections),
            "-t",
            f"{seconds:g}s",
            # Spread the connections' send times instead of firing 16 requests at each tick.
            "-uniform",
            # 10 µs lowest buckets: the default 1 ms would round every loopback latency to one bucket.
            "-r",
            "0.00001",
            "-p",
            "50,90,99",
            "-json",
            str(report),
            *(["-H", f"Host: {host}"] if host else []),
            url,
        ]
        _run(command, timeout=seconds + 30)
        data = json.loads(report.read_text())
    codes = {int(code): count for code, count in data["RetCodes"].items()}
    histogram = data["DurationHistogram"]
    percentiles = {f"p{p['Percentile']:g}": p["Value"] * 1e6 for p in histogram["Percentiles"]}
    return LoadResult(
        tool="fortio",
        command=" ".join(command),
        requests=histogram["Count"],
        seconds=data["ActualDuration"] / 1e9,
        requests_per_second=data["ActualQPS"],
        non_2xx=sum(count for code, count in codes.items() if not 200 <= code < 300 and code != -1),
        socket_errors=codes.get(-1, 0),  # fortio files connection and read errors under code -1
        latency_us=percentiles,
        details={
            "requested_qps": qps,
            # More sockets than connections means the peer closed kept-alive connections.
            "reconnects": data.get("SocketCount", connections) - connections,
            "max_us": histogram["Max"] * 1e6,
        },
    )
