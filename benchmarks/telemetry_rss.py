"""Issue 11's memory budget: a sidecar's RSS after an HTTP/2 load, with Istio's metrics on and
tracing at 1 % and at 100 % sampling, beside the same build without telemetry.

    python -m benchmarks.telemetry_rss [--meshctl meshctl] [--requests 200000]

Each peer is one `meshctl run --bootstrap` (one worker) serving the benchmark's upstream; h2load
sends `--requests` requests over h2c (8 connections x 10 streams), and the table gives the
sidecar's VmRSS before and after (and its peak, VmHWM). The traced bootstraps export to a
collector that is not there: every span fails and is dropped off the request path, which is
the queue's worst case (it stays full). Memory is not the VM's CPU noise: one run says enough.
The budget (issue 11): ≤ 30 MiB after the HTTP/2 load.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

from benchmarks import overhead, peers, procfs

BUDGET_MIB = 30.0
TRACED = peers.CONFIGS / "meshctl-traced.yaml"
METRICS = peers.CONFIGS / "meshctl-istio-metrics.yaml"


def sampled_at(percent: int, directory: Path) -> Path:
    """The traced bootstrap with its random sampling at `percent`."""
    text = TRACED.read_text()
    changed = re.sub(r"random_sampling: \{ value: \d+ \}", f"random_sampling: {{ value: {percent} }}", text)
    if changed == text and percent != 1:
        raise SystemExit(f"{TRACED} has no random_sampling line to change")
    path = directory / f"meshctl-traced-{percent}.yaml"
    path.write_text(changed)
    return path


def peak_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meshctl", default="meshctl", help="the meshctl command to measure")
    parser.add_argument("--requests", type=int, default=200_000)
    arguments = parser.parse_args(argv)
    if not shutil.which("h2load"):
        raise SystemExit("h2load not found: apt-get install nghttp2-client")
    command = shlex.split(arguments.meshctl)
    rundir = Path(tempfile.mkdtemp(prefix="telemetry-rss-"))
    compared = {
        "no telemetry": peers.BOOTSTRAP,
        "Istio metrics": METRICS,
        "tracing at 1 %": sampled_at(1, rundir),
        "tracing at 100 %": sampled_at(100, rundir),
    }
    upstream = peers.start(peers.UPSTREAM, rundir / "upstream", cpu=peers.LOADGEN_CPU)
    rows = []
    try:
        for label, bootstrap in compared.items():
            spec = overhead.meshctl_peer(label.replace(" ", "-").replace("%", "pct"), command, bootstrap)
            peer = peers.start(spec, rundir / spec.name)
            try:
                assert peer.pid is not None
                before = procfs.rss_kb(peer.pid)
                done = subprocess.run(["h2load", "-c", "8", "-m", "10", "-n", str(arguments.requests),
                                       f"http://127.0.0.1:{spec.h2c_port}/"], capture_output=True, text=True,
                                      timeout=900, check=False)  # fmt: skip
                succeeded = re.search(r"(\d+) succeeded", done.stdout)
                rows.append((label, before, procfs.rss_kb(peer.pid), peak_kb(peer.pid),
                             int(succeeded.group(1)) if succeeded else 0))  # fmt: skip
                print(f"{label}: RSS {before / 1024:.1f} → {rows[-1][2] / 1024:.1f} MiB, peak {rows[-1][3] / 1024:.1f} MiB, "
                      f"{rows[-1][4]:,} of {arguments.requests:,} requests succeeded", flush=True)  # fmt: skip
            finally:
                peer.stop()
    finally:
        upstream.stop()
    print(f"\n| sidecar | RSS before | RSS after {arguments.requests:,} h2c requests | peak (VmHWM) | succeeded | ≤ {BUDGET_MIB:.0f} MiB |")
    print("|---|---|---|---|---|---|")
    for label, before, after, peak, succeeded in rows:
        verdict = "met" if after / 1024 <= BUDGET_MIB else "NOT met"
        print(f"| {label} | {before / 1024:.1f} MiB | {after / 1024:.1f} MiB | {peak / 1024:.1f} MiB | {succeeded:,} | {verdict} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
