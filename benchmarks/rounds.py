"""Measures every peer once per round in alternating order (A B C, B C A, ...), each proxy freshly started on CPU 1."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from benchmarks import loadgen, peers, procfs
from benchmarks.store import Store


@dataclass(frozen=True)
class Settings:
    rounds: int
    seconds: float
    warmup_seconds: float
    rundir: Path


@dataclass(frozen=True)
class Scenario:
    """One load shape applied to several peers; `load(url, seconds)` runs the generator once."""

    name: str
    title: str
    peers: tuple[peers.PeerSpec, ...]
    url: Callable[[peers.PeerSpec], str]
    load: Callable[[str, float], loadgen.LoadResult]
    tool: str
    notes: str = ""


# A proxy just started still faults in its heap; give it a moment before "idle" RSS is read.
SETTLE_SECONDS = 0.5


class _Clocks(NamedTuple):
    """CPU counters read just before and just after the measured load."""

    proxy: float
    upstream: float
    loadgen: float
    cores: procfs.CoreTimes

    @staticmethod
    def read(peer: peers.RunningPeer, upstream: peers.RunningPeer) -> _Clocks:
        # The load generator is a reaped child by the time this is read after a run.
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return _Clocks(
            peer.cpu_seconds() or 0.0,
            upstream.cpu_seconds() or 0.0,
            children.ru_utime + children.ru_stime,
            procfs.CoreTimes.read(),
        )


def measure(
    spec: peers.PeerSpec,
    scenario: Scenario,
    settings: Settings,
    round_number: int,
    upstream: peers.RunningPeer,
) -> dict:
    """Start the peer, warm it up, run the measured load, read RSS and CPU, stop it."""
    sample: dict = {"peer": spec.name, "round": round_number, "status": "ok"}
    peer = peers.start(spec, settings.rundir / f"{scenario.name}-{spec.name}-{round_number}")
    try:
        time.sleep(SETTLE_SECONDS)
        sample["rss_idle_kb"] = peer.rss_kb()
        url = scenario.url(spec)
        if settings.warmup_seconds > 0:
            scenario.load(url, settings.warmup_seconds)
        before = _Clocks.read(peer, upstream)
        result = scenario.load(url, settings.seconds)
        after = _Clocks.read(peer, upstream)
        sample["rss_after_kb"] = peer.rss_kb()
        sample["result"] = result.as_dict()
    finally:
        peer.stop()
    proxy_cpu, upstream_cpu, loadgen_cpu = (a - b for a, b in zip(after[:3], before[:3]))
    core0 = after.cores.since(before.cores, peers.LOADGEN_CPU)
    core1 = after.cores.since(before.cores, peers.PROXY_CPU)
    sample["cpu0_busy_pct"] = core0.percent(core0.tasks + core0.interrupts + core0.steal)
    # What other people's processes (and the hypervisor) took from each core during the run.
    sample["cpu0_other_pct"] = max(
        0.0, core0.percent(core0.tasks - loadgen_cpu - upstream_cpu + core0.steal)
    )
    sample["cpu1_other_pct"] = max(0.0, core1.percent(core1.tasks - proxy_cpu + core1.steal))
    sample["loadgen_cpu_pct"] = core0.percent(loadgen_cpu)
    if spec.command is not None:
        sample["proxy_cpu_pct"] = core1.percent(proxy_cpu)
        if result.requests:
            sample["proxy_cpu_s_per_1k"] = 1000 * proxy_cpu / result.requests
    return sample


def run_round(
    scenario: Scenario,
    settings: Settings,
    store: Store,
    round_number: int,
    available: dict,
    upstream: peers.RunningPeer,
) -> None:
    """One pass over the peers; a failing proxy is recorded and the pass goes on. Each round
    starts one peer later (A B C, B C A, C A B): a peer measured always last in its round would
    carry whatever a round's earlier runs leave behind (sockets in TIME_WAIT, a warmer or busier
    machine), and a budget compares peers run side by side."""
    shift = (round_number - 1) % max(len(scenario.peers), 1)
    for spec in scenario.peers[shift:] + scenario.peers[:shift]:
        if available.get(spec.name) is not None:
            continue
        try:
            sample = measure(spec, scenario, settings, round_number, upstream)
        except (peers.PeerFailed, loadgen.LoadFailed) as error:
            if spec.command is None:
                raise  # direct failing means the harness itself is broken
            sample = {
                "peer": spec.name,
                "round": round_number,
                "status": "failed",
                "reason": str(error)[:2000],
            }
        store.add(scenario.name, sample)
        _progress(scenario, sample)


def _progress(scenario: Scenario, sample: dict) -> None:
    """One line per measurement, so a ten-minute run shows it is alive."""
    if sample["status"] != "ok":
        figure = f"{sample['status']}: {sample['reason'].splitlines()[0][:120]}"
    else:
        result = sample["result"]
        figure = f"{result['requests_per_second']:,.0f} req/s"
        if result["latency_us"]:
            figure += ", " + ", ".join(f"{k} {v:,.0f} µs" for k, v in result["latency_us"].items())
        figure += f", errors {result['non_2xx']}+{result['socket_errors']}"
    print(f"  [{scenario.name} round {sample['round']}] {sample['peer']}: {figure}", flush=True)


def record_unavailable(
    scenario: Scenario, store: Store, available: dict, tool_missing: str | None = None
) -> None:
    for spec in scenario.peers:
        reason = tool_missing or available.get(spec.name)
        if reason is not None:
            store.add(
                scenario.name,
                {"peer": spec.name, "round": 0, "status": "not available", "reason": reason},
            )
