"""pytest wiring for the load benchmarks: settings from the environment, the upstream, the results store."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from benchmarks import loadgen, peers
from benchmarks.rounds import Scenario, Settings, record_unavailable, run_round
from benchmarks.store import RESULTS, Store

# These tests saturate the machine for minutes, so a plain `pytest` (CI) must not collect them;
# benchmarks/run.sh sets MESHCTL_BENCH=1.
if os.environ.get("MESHCTL_BENCH") != "1":
    collect_ignore_glob = ["test_*.py"]


def _env_number(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def _version(command: list[str]) -> str:
    if not shutil.which(command[0]) and not Path(command[0]).is_file():
        return "not installed"
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unknown ({error})"
    lines = (result.stdout + result.stderr).strip().splitlines()
    if not lines:
        return "unknown"
    # Envoy prints its binary's path first, whose python3.11 directory would pass for a version.
    after_label = lines[0].split("version:", 1)[-1]
    found = re.search(r"\d+\.\d+(\.\d+)?", after_label)
    return found.group(0) if found else lines[0][:80]


def _commit() -> str:
    """The repository's HEAD, marked dirty when the work tree differs: meshctl changes fast."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}{' (dirty)' if dirty else ''}"


def _machine() -> dict:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown",
    )
    return {"cores": os.cpu_count(), "cpu": model, "kernel": platform.release()}


@pytest.fixture(scope="session")
def settings() -> Settings:
    # Peers' logs and pid files from the last run only, beside the results (both gitignored).
    rundir = RESULTS / "run"
    shutil.rmtree(rundir, ignore_errors=True)
    rundir.mkdir(parents=True)
    return Settings(
        rounds=int(_env_number("BENCH_ROUNDS", 3)),
        seconds=_env_number("BENCH_SECONDS", 10),
        warmup_seconds=_env_number("BENCH_WARMUP_SECONDS", 2),
        rundir=rundir,
    )


@pytest.fixture(scope="session")
def availability() -> dict[str, str | None]:
    """Peer name -> why it cannot run (None when it can), decided once per session."""
    return {"direct": None, **{spec.name: spec.unavailable_reason() for spec in peers.ALL_PROXIES}}


@pytest.fixture(scope="session")
def store(settings: Settings, availability: dict) -> Store:
    meshctl = peers.meshctl_command()
    meta = {
        "command": os.environ.get("BENCH_COMMAND", "pytest benchmarks/"),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": _machine(),
        "commit": _commit(),
        "load_average_at_start": os.getloadavg(),
        "settings": {
            "rounds": settings.rounds,
            "seconds": settings.seconds,
            "warmup_seconds": settings.warmup_seconds,
            "nice": os.environ.get("BENCH_NICE", "0"),
        },
        "availability": availability,
        "versions": {
            "envoy": _version([peers.envoy_binary() or "envoy", "--version"]),
            "haproxy": _version(["haproxy", "-v"]),
            "nginx": _version(["nginx", "-v"]),
            "wrk": _version([loadgen.find_tool("wrk") or "wrk", "--version"]),
            "h2load": _version([loadgen.find_tool("h2load") or "h2load", "--version"]),
            "fortio": _version([loadgen.find_tool("fortio") or "fortio", "version"]),
            "meshctl": _version([*meshctl, "--version"]) if meshctl else "not installed",
        },
    }
    result_store = Store(meta=meta)
    yield result_store
    result_store.update_meta(
        finished=time.strftime("%Y-%m-%d %H:%M:%S %Z"), load_average_at_end=os.getloadavg()
    )


@pytest.fixture(scope="session")
def upstream(settings: Settings):
    """The nginx upstream, pinned to the load generator's core for the whole session."""
    running = peers.start(peers.UPSTREAM, settings.rundir / "upstream", cpu=peers.LOADGEN_CPU)
    yield running
    running.stop()


@dataclass
class Bench:
    """What a benchmark test needs: settings, the store and which peers can run."""

    settings: Settings
    store: Store
    availability: dict[str, str | None]
    upstream: peers.RunningPeer

    def run(self, benchmark, scenario: Scenario) -> None:
        """Alternate the scenario's peers for `rounds` rounds; pytest-benchmark times each round."""
        self.store.describe(scenario.name, title=scenario.title, notes=scenario.notes)
        if loadgen.find_tool(scenario.tool) is None:
            record_unavailable(
                scenario, self.store, self.availability, f"`{scenario.tool}` not installed"
            )
            pytest.skip(f"{scenario.tool} not installed")
        record_unavailable(scenario, self.store, self.availability)
        print(f"\n{scenario.title}: {self.settings.rounds} rounds", flush=True)
        round_numbers = iter(range(1, self.settings.rounds + 1))

        def one_round() -> None:
            run_round(
                scenario,
                self.settings,
                self.store,
                next(round_numbers),
                self.availability,
                self.upstream,
            )

        benchmark.pedantic(one_round, rounds=self.settings.rounds, iterations=1, warmup_rounds=0)
        samples = self.store.samples(scenario.name)
        benchmark.extra_info["scenario"] = scenario.title
        benchmark.extra_info["samples"] = samples
        failed = [
            f"{s['peer']} round {s['round']}: {s['reason']}"
            for s in samples
            if s["status"] == "failed"
        ]
        assert not failed, "peers failed under load:\n" + "\n".join(failed)


@pytest.fixture
def bench(settings: Settings, store: Store, availability: dict, upstream) -> Bench:
    return Bench(settings, store, availability, upstream)
