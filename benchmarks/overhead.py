"""A feature configured but never triggered, against the same proxy without it: req/s and latency per
peer, alternating each round, with each peer's req/s over its baseline's in the same round against the
issue's budget. `resilience_overhead` (issue 9) and `ratelimit_overhead` (issue 10) each define a
`Comparison` and call `main`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks import loadgen, peers
# The main report's cell helpers, so both tables read alike.
from benchmarks.report import (
    _added,
    _count,
    _cpu_per_1k,
    _micros,
    _noise,
    _ok,
    _spread,
    _table,
    _values,
)
from benchmarks.rounds import Scenario, Settings, record_unavailable, run_round
from benchmarks.store import RESULTS, Store


@dataclass(frozen=True)
class Peer:
    """One proxy of a comparison: `label` in the table; `baseline` the peer whose req/s in the same
    round it is divided by (None: no ratio); `budget` the least such ratio the issue allows."""

    spec: peers.PeerSpec
    label: str
    baseline: str | None = None
    budget: float | None = None


@dataclass(frozen=True)
class Comparison:
    module: str  # `python -m benchmarks.<module>`
    title: str  # the report's heading
    peers: Callable[[argparse.Namespace], tuple[Peer, ...]]
    add_arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None
    versions: Callable[[argparse.Namespace], dict[str, str]] = lambda arguments: {}

    @property
    def raw(self) -> Path:
        return RESULTS / f"{self.module}.json"

    @property
    def table(self) -> Path:
        return RESULTS / f"{self.module}.md"


DIRECT_LABEL = "direct (no proxy)"


def meshctl_peer(name: str, command: list[str], bootstrap: Path) -> peers.PeerSpec:
    """A meshctl build serving `bootstrap` with one worker, as benchmarks/peers.py runs meshctl."""
    return peers.PeerSpec(
        name,
        peers.MESH_PORT,
        peers.MESH_PORT,
        lambda rundir: [*command, "run", "--bootstrap", str(bootstrap), "--workers", "1"],
        lambda: peers.run_bootstrap_unavailable(command),
    )


def version_of(command: list[str]) -> str:
    """What `command --version` says, and the extension module it loads (builds are easy to mix
    up)."""
    probe = "import meshctl._core as c; print(c.__file__)"
    python = Path(command[0]).with_name("python")
    said = subprocess.run([*command, "--version"], capture_output=True, text=True, check=False)
    text = (said.stdout + said.stderr).strip().splitlines()[:1] or ["?"]
    if python.is_file():
        core = subprocess.run(
            [str(python), "-c", probe], capture_output=True, text=True, check=False, cwd="/"
        )
        text.append(core.stdout.strip() or core.stderr.strip()[-120:])
    return "; ".join(text)


def scenarios(proxies: tuple[peers.PeerSpec, ...], qps: int) -> list[Scenario]:
    everyone = (peers.DIRECT, *proxies)
    http1 = lambda spec: f"http://127.0.0.1:{spec.http1_port}/"
    return [
        Scenario("http1", "HTTP/1.1 keep-alive throughput (wrk -t1 -c64)", everyone, http1,
                 lambda url, seconds: loadgen.wrk(url, seconds=seconds), "wrk"),
        Scenario("http2", "HTTP/2 throughput (h2load -c16 -m10, h2c downstream)", everyone,
                 lambda spec: f"http://127.0.0.1:{spec.h2c_port}/",
                 lambda url, seconds: loadgen.h2load(url, seconds=seconds), "h2load"),
        Scenario("latency", f"open-loop latency at {qps:,} req/s (fortio -c16 -uniform)", everyone,
                 http1, lambda url, seconds: loadgen.fortio(url, qps=qps, seconds=seconds), "fortio"),
    ]  # fmt: skip


# --- the table ---------------------------------------------------------------------------------


def paired_ratios(samples: list[dict], peer: str, baseline: str, pick: Callable[[dict], float]) -> list[float]:
    """`peer` over `baseline` in each round both ran: slow drift of a shared machine cancels out."""
    base = {s["round"]: pick(s) for s in _ok(samples, baseline)}
    return [pick(s) / base[s["round"]] for s in _ok(samples, peer) if base.get(s["round"])]


def _ratio_text(value: float) -> str:
    return f"{value:.3f}×"


def _verdict(peer: Peer | None, ratios: list[float]) -> str:
    if peer is None or peer.budget is None or not ratios:
        return "–"
    met = statistics.median(ratios) >= peer.budget
    return f"{'met' if met else 'NOT met'} (≥ {peer.budget:.2f}×)"


def _failure(samples: list[dict], peer: str) -> str | None:
    mine = [s for s in samples if s["peer"] == peer]
    if _ok(samples, peer):
        return None
    if not mine:
        return "not measured"
    first_line = (mine[0].get("reason", "").strip().splitlines() or [""])[0]
    return f"{mine[0]['status']}: {first_line}"[:200]


def _label_and_baseline(peer: str, by_name: dict[str, Peer]) -> tuple[str, str | None]:
    """A peer's label in the tables, and the peer its figures are compared with (none for direct)."""
    if peer not in by_name:
        return DIRECT_LABEL, None
    return by_name[peer].label, by_name[peer].baseline


def throughput_rows(samples: list[dict], names: list[str], by_name: dict[str, Peer]) -> list[str]:
    rps = lambda s: s["result"]["requests_per_second"]
    header = ["peer", "req/s median (min–max)", "vs its baseline, same round", "budget",
              "non-2xx", "socket errors", "proxy CPU-s / 1k req", "others on CPU 0 / 1 %"]  # fmt: skip
    rows = []
    for peer in names:
        label, baseline = _label_and_baseline(peer, by_name)
        failed = _failure(samples, peer)
        if failed:
            rows.append([label, failed, *[""] * (len(header) - 2)])
            continue
        ok = _ok(samples, peer)
        ratios = paired_ratios(samples, peer, baseline, rps) if baseline else []
        rows.append([
            label if not baseline else f"{label} (vs {by_name[baseline].label})",
            _spread(_values(ok, rps)),
            _spread(ratios, _ratio_text) if ratios else "–",
            _verdict(by_name.get(peer), ratios),
            _count(sum(s["result"]["non_2xx"] for s in ok)),
            _count(sum(s["result"]["socket_errors"] for s in ok)),
            _cpu_per_1k(ok) if peer != "direct" else "–",
            _noise(ok),
        ])  # fmt: skip
    return _table(header, rows)


def latency_rows(samples: list[dict], names: list[str], by_name: dict[str, Peer]) -> list[str]:
    header = ["peer", "p50 µs", "p99 µs", "added p50 µs", "added p99 µs",
              "added p50 − its baseline's µs", "added p99 − its baseline's µs", "achieved req/s",
              "non-2xx", "socket errors"]  # fmt: skip
    rows = []
    for peer in names:
        label, baseline = _label_and_baseline(peer, by_name)
        failed = _failure(samples, peer)
        if failed:
            rows.append([label, failed, *[""] * (len(header) - 2)])
            continue
        ok = _ok(samples, peer)
        def latency(key: str) -> str:
            return _spread(_values(ok, lambda s: s["result"]["latency_us"][key]), _micros)

        def added(key: str) -> str:
            return "–" if peer == "direct" else _spread(_added(samples, peer, key), _micros)

        rows.append([
            label, latency("p50"), latency("p99"), added("p50"), added("p99"),
            versus_baseline(samples, peer, baseline, "p50"), versus_baseline(samples, peer, baseline, "p99"),
            _count(statistics.median(_values(ok, lambda s: s["result"]["requests_per_second"]))),
            _count(sum(s["result"]["non_2xx"] for s in ok)),
            _count(sum(s["result"]["socket_errors"] for s in ok)),
        ])  # fmt: skip
    return _table(header, rows)


def versus_baseline(samples: list[dict], peer: str, baseline: str | None, key: str) -> str:
    """How much latency `peer` adds beyond what its baseline added, round by round."""
    if baseline is None:
        return "–"
    base = {s["round"]: s["result"]["latency_us"][key] for s in _ok(samples, baseline)}
    deltas = [
        s["result"]["latency_us"][key] - base[s["round"]]
        for s in _ok(samples, peer)
        if s["round"] in base
    ]
    return _spread(deltas, lambda v: f"{v:+,.0f}")


def render(comparison: Comparison, compared: tuple[Peer, ...], data: dict) -> str:
    meta = data["meta"]
    by_name = {peer.spec.name: peer for peer in compared}
    labels = {"direct": DIRECT_LABEL, **{name: peer.label for name, peer in by_name.items()}}
    lines = [
        f"## {comparison.title}",
        "",
        f"- command: `{meta['command']}`",
        f"- started {meta['started']}, finished {meta.get('finished', '?')}; load average at start "
        f"{', '.join(f'{v:.2f}' for v in meta['load_average_at_start'])}; {os.cpu_count()} cores",
        f"- rounds: {meta['settings']['rounds']}, {meta['settings']['seconds']} s per measurement "
        f"(after {meta['settings']['warmup_seconds']} s warm-up), peers alternated each round; "
        "proxies fresh per measurement, one worker, CPU 1; client and upstream nginx on CPU 0",
        *[f"- {labels[name]}: `{command}`" for name, command in meta["commands"].items()],
        *[f"- version of {name}: {text}" for name, text in meta["versions"].items()],
        "",
    ]
    for name, scenario in data["scenarios"].items():
        samples = scenario["samples"]
        names = [n for n in labels if any(s["peer"] == n for s in samples)]
        table = latency_rows if name == "latency" else throughput_rows
        rows = table(samples, names, by_name)
        lines += [f"### {scenario['title']}", "", *rows, ""]
        # A measurement that failed is left out of the figures, never out of the report.
        lines += [
            f"- {labels[s['peer']]}, round {s['round']}: {s['status']}: "
            f"{(s.get('reason', '').strip().splitlines() or [''])[0][:160]}"
            for s in samples
            if s["status"] != "ok" and _ok(samples, s["peer"])
        ]
    lines += [
        "_Cells are median (min–max) over rounds. Ratios pair each round's figure with the peer's "
        "baseline's in the same round; added latency is the peer's minus direct's in the same round._",
        "",
    ]
    return "\n".join(lines)


# --- the run -----------------------------------------------------------------------------------


def parse_arguments(comparison: Comparison, argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{comparison.module}", description=comparison.title)
    environ = os.environ.get
    comparison.add_arguments(parser)
    parser.add_argument(
        "--after", help="command running today's meshctl (default: MESHCTL, else meshctl on PATH)"
    )
    parser.add_argument("--rounds", type=int, default=int(environ("BENCH_ROUNDS", 5)))
    parser.add_argument("--seconds", type=float, default=float(environ("BENCH_SECONDS", 10)))
    parser.add_argument("--warmup", type=float, default=float(environ("BENCH_WARMUP_SECONDS", 2)))
    parser.add_argument("--qps", type=int, default=2000, help="fortio's fixed request rate")
    parser.add_argument("--only", default="http1,http2,latency", help="scenarios, comma-separated")
    arguments = parser.parse_args(argv)
    for option in ("seconds", "warmup"):
        # wrk refuses a fractional duration (-d0.5s), and finds out only after the peers started.
        if not float(getattr(arguments, option)).is_integer():
            parser.error(f"--{option} {getattr(arguments, option)}: whole seconds (wrk needs them)")
    after = shlex.split(arguments.after) if arguments.after else peers.meshctl_command()
    if after is None:
        parser.error("no `meshctl` on PATH: give --after COMMAND or set MESHCTL")
    arguments.after_command = after
    return arguments


def main(comparison: Comparison, argv: list[str] | None = None) -> int:
    arguments = parse_arguments(comparison, argv)
    compared = comparison.peers(arguments)
    proxies = tuple(peer.spec for peer in compared)
    available = {"direct": None, **{spec.name: spec.unavailable_reason() for spec in proxies}}
    rundir = RESULTS / "run" / comparison.module
    # Peers' logs from the last run only (results/ is not committed).
    shutil.rmtree(rundir, ignore_errors=True)
    settings = Settings(arguments.rounds, arguments.seconds, arguments.warmup, rundir)
    given = sys.argv[1:] if argv is None else argv
    store = Store(comparison.raw, meta={
        "command": shlex.join(["python", "-m", f"benchmarks.{comparison.module}", *given]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "load_average_at_start": os.getloadavg(),
        "settings": {"rounds": settings.rounds, "seconds": settings.seconds,
                     "warmup_seconds": settings.warmup_seconds},
        "commands": {spec.name: shlex.join(spec.command(rundir)) for spec in proxies},
        "versions": {**comparison.versions(arguments), "after": version_of(arguments.after_command)},
        "availability": available,
    })  # fmt: skip
    wanted = set(arguments.only.split(","))
    chosen = [s for s in scenarios(proxies, arguments.qps) if s.name in wanted]
    runnable = []
    for scenario in chosen:
        store.describe(scenario.name, title=scenario.title)
        missing = None if loadgen.find_tool(scenario.tool) else f"`{scenario.tool}` not installed"
        record_unavailable(scenario, store, available, missing)
        if missing is None:
            runnable.append(scenario)
    for name, reason in available.items():
        if reason:
            print(f"{name}: not available: {reason}", file=sys.stderr)
    upstream = peers.start(peers.UPSTREAM, rundir / "upstream", cpu=peers.LOADGEN_CPU)
    try:
        for number in range(1, settings.rounds + 1):
            print(f"round {number}/{settings.rounds}", flush=True)
            for scenario in runnable:
                run_round(scenario, settings, store, number, available, upstream)
    finally:
        upstream.stop()
        store.update_meta(finished=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    text = render(comparison, compared, store.data)
    comparison.table.write_text(text + "\n")
    print(f"\n{text}\n(written to {comparison.table})")
    return 0
