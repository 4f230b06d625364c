"""Issue 9's overhead budget: meshctl before resilience (188dc2b) against today's, plain and configured.

    python -m benchmarks.resilience_overhead --before /work/wt-before/.venv/bin/meshctl

Peers, all on the benchmark's bootstrap shape (one listener, one route, one cluster to the nginx
upstream), alternating per round (direct, before, after-unconfigured, after-configured, again...):
- direct: the client hits the upstream itself (the baseline of "added" latency);
- before: the `--before` command (meshctl built at 188dc2b, the engine before issue 9) on
  configs/meshctl-or-envoy.yaml;
- after-unconfigured: the `--after` command (default: MESHCTL, else `meshctl` on PATH) on the same
  bootstrap: no retry policy, no circuit breaker thresholds, no outlier detection;
- after-configured: the `--after` command on configs/meshctl-resilient.yaml: the same with a retry
  policy on the route, circuit breaker thresholds and outlier detection on the cluster, none of
  which the healthy upstream ever triggers.
Each round measures wrk HTTP/1.1 req/s (-c64), h2load HTTP/2 req/s (-c16 -m10) and fortio latency at
--qps (2,000) req/s; the table gives medians, min–max spreads, each peer's req/s as a ratio to
`before` in the same round (median of the rounds' ratios) against the issue's budget (≥ 0.97×
unconfigured, ≥ 0.95× configured), and p50/p99 added over direct. Proxies run one worker pinned
to CPU 1 and are started fresh per measurement; client and upstream on CPU 0 (BENCHMARKING.md).
Raw samples go to results/resilience_overhead.json, the table to results/resilience_overhead.md.
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

RESILIENT_BOOTSTRAP = peers.CONFIGS / "meshctl-resilient.yaml"
RAW = RESULTS / "resilience_overhead.json"
TABLE = RESULTS / "resilience_overhead.md"
BEFORE, UNCONFIGURED, CONFIGURED = "before", "after-unconfigured", "after-configured"
# The issue's budget: the least share of `before`'s req/s each build may keep.
BUDGET = {UNCONFIGURED: 0.97, CONFIGURED: 0.95}
LABELS = {
    "direct": "direct (no proxy)",
    BEFORE: "before (188dc2b)",
    UNCONFIGURED: "after, unconfigured",
    CONFIGURED: "after, retries + breakers + outlier configured",
}


def meshctl_peer(name: str, command: list[str], bootstrap: Path) -> peers.PeerSpec:
    """A meshctl build serving `bootstrap` with one worker, as benchmarks/peers.py runs meshctl."""
    return peers.PeerSpec(
        name,
        peers.MESH_PORT,
        peers.MESH_PORT,
        lambda rundir: [*command, "run", "--bootstrap", str(bootstrap), "--workers", "1"],
        lambda: why_unusable(command),
    )


def why_unusable(command: list[str]) -> str | None:
    """None if `command run --bootstrap` exists, else why not (checked once, before any load)."""
    try:
        result = subprocess.run(
            [*command, "run", "--help"], capture_output=True, text=True, check=False, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"{shlex.join(command)} run --help: {error}"
    if result.returncode != 0 or "--bootstrap" not in result.stdout:
        last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        return f"{shlex.join(command)} has no `run --bootstrap` ({last[0][:120]})"
    return None


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


def paired_ratios(samples: list[dict], peer: str, pick: Callable[[dict], float]) -> list[float]:
    """`peer` over `before` in each round both ran: slow drift of a shared machine cancels out."""
    before = {s["round"]: pick(s) for s in _ok(samples, BEFORE)}
    return [pick(s) / before[s["round"]] for s in _ok(samples, peer) if before.get(s["round"])]


def _ratio_text(value: float) -> str:
    return f"{value:.3f}×"


def _verdict(peer: str, ratios: list[float]) -> str:
    if peer not in BUDGET or not ratios:
        return "–"
    met = statistics.median(ratios) >= BUDGET[peer]
    return f"{'met' if met else 'NOT met'} (≥ {BUDGET[peer]:.2f}×)"


def _failure(samples: list[dict], peer: str) -> str | None:
    mine = [s for s in samples if s["peer"] == peer]
    if _ok(samples, peer):
        return None
    if not mine:
        return "not measured"
    first_line = (mine[0].get("reason", "").strip().splitlines() or [""])[0]
    return f"{mine[0]['status']}: {first_line}"[:200]


def throughput_rows(samples: list[dict], names: list[str]) -> list[str]:
    rps = lambda s: s["result"]["requests_per_second"]
    header = ["peer", "req/s median (min–max)", "vs before, same round", "budget",
              "non-2xx", "socket errors", "proxy CPU-s / 1k req", "others on CPU 0 / 1 %"]  # fmt: skip
    rows = []
    for peer in names:
        failed = _failure(samples, peer)
        if failed:
            rows.append([LABELS[peer], failed, *[""] * (len(header) - 2)])
            continue
        ok = _ok(samples, peer)
        ratios = paired_ratios(samples, peer, rps) if peer not in ("direct", BEFORE) else []
        rows.append([
            LABELS[peer],
            _spread(_values(ok, rps)),
            _spread(ratios, _ratio_text) if ratios else "–",
            _verdict(peer, ratios),
            _count(sum(s["result"]["non_2xx"] for s in ok)),
            _count(sum(s["result"]["socket_errors"] for s in ok)),
            _cpu_per_1k(ok) if peer != "direct" else "–",
            _noise(ok),
        ])  # fmt: skip
    return _table(header, rows)


def latency_rows(samples: list[dict], names: list[str]) -> list[str]:
    header = ["peer", "p50 µs", "p99 µs", "added p50 µs", "added p99 µs",
              "added p50 − before's µs", "added p99 − before's µs", "achieved req/s",
              "non-2xx", "socket errors"]  # fmt: skip
    rows = []
    for peer in names:
        failed = _failure(samples, peer)
        if failed:
            rows.append([LABELS[peer], failed, *[""] * (len(header) - 2)])
            continue
        ok = _ok(samples, peer)
        def latency(key: str) -> str:
            return _spread(_values(ok, lambda s: s["result"]["latency_us"][key]), _micros)

        def added(key: str) -> str:
            return "–" if peer == "direct" else _spread(_added(samples, peer, key), _micros)

        rows.append([
            LABELS[peer], latency("p50"), latency("p99"), added("p50"), added("p99"),
            versus_before(samples, peer, "p50"), versus_before(samples, peer, "p99"),
            _count(statistics.median(_values(ok, lambda s: s["result"]["requests_per_second"]))),
            _count(sum(s["result"]["non_2xx"] for s in ok)),
            _count(sum(s["result"]["socket_errors"] for s in ok)),
        ])  # fmt: skip
    return _table(header, rows)


def versus_before(samples: list[dict], peer: str, key: str) -> str:
    """How much latency `peer` adds beyond what `before` added, round by round."""
    if peer in ("direct", BEFORE):
        return "–"
    before = {s["round"]: s["result"]["latency_us"][key] for s in _ok(samples, BEFORE)}
    deltas = [
        s["result"]["latency_us"][key] - before[s["round"]]
        for s in _ok(samples, peer)
        if s["round"] in before
    ]
    return _spread(deltas, lambda v: f"{v:+,.0f}")


def render(data: dict) -> str:
    meta = data["meta"]
    lines = [
        "## Resilience overhead (issue 9)",
        "",
        f"- command: `{meta['command']}`",
        f"- started {meta['started']}, finished {meta.get('finished', '?')}; load average at start "
        f"{', '.join(f'{v:.2f}' for v in meta['load_average_at_start'])}; {os.cpu_count()} cores",
        f"- rounds: {meta['settings']['rounds']}, {meta['settings']['seconds']} s per measurement "
        f"(after {meta['settings']['warmup_seconds']} s warm-up), peers alternated each round; "
        "proxies fresh per measurement, one worker, CPU 1; client and upstream nginx on CPU 0",
        *[f"- {LABELS[name]}: `{command}`" for name, command in meta["commands"].items()],
        *[f"- version of {name}: {text}" for name, text in meta["versions"].items()],
        "",
    ]
    for name, scenario in data["scenarios"].items():
        samples = scenario["samples"]
        names = [n for n in LABELS if any(s["peer"] == n for s in samples)]
        table = latency_rows if name == "latency" else throughput_rows
        rows = table(samples, names)
        lines += [f"### {scenario['title']}", "", *rows, ""]
        # A measurement that failed is left out of the figures, never out of the report.
        lines += [
            f"- {LABELS[s['peer']]}, round {s['round']}: {s['status']}: "
            f"{(s.get('reason', '').strip().splitlines() or [''])[0][:160]}"
            for s in samples
            if s["status"] != "ok" and _ok(samples, s["peer"])
        ]
    lines += [
        "_Cells are median (min–max) over rounds. Ratios pair each round's figure with `before`'s "
        "in the same round; added latency is the peer's minus direct's in the same round._",
        "",
    ]
    return "\n".join(lines)


# --- the run -----------------------------------------------------------------------------------


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.resilience_overhead",
        description=__doc__.splitlines()[0],
    )
    environ = os.environ.get
    parser.add_argument(
        "--before",
        default=environ("MESHCTL_BEFORE"),
        help="command running meshctl built at 188dc2b (env MESHCTL_BEFORE)",
    )
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
    if not arguments.before:
        parser.error("give --before COMMAND (or MESHCTL_BEFORE): a meshctl built at 188dc2b")
    return arguments


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    before = shlex.split(arguments.before)
    after = shlex.split(arguments.after) if arguments.after else peers.meshctl_command()
    if after is None:
        sys.exit("no `meshctl` on PATH: give --after COMMAND or set MESHCTL")
    proxies = (
        meshctl_peer(BEFORE, before, peers.BOOTSTRAP),
        meshctl_peer(UNCONFIGURED, after, peers.BOOTSTRAP),
        meshctl_peer(CONFIGURED, after, RESILIENT_BOOTSTRAP),
    )
    available = {"direct": None, **{spec.name: spec.unavailable_reason() for spec in proxies}}
    rundir = RESULTS / "run" / "resilience_overhead"
    # Peers' logs from the last run only (results/ is not committed).
    shutil.rmtree(rundir, ignore_errors=True)
    settings = Settings(arguments.rounds, arguments.seconds, arguments.warmup, rundir)
    given = sys.argv[1:] if argv is None else argv
    store = Store(RAW, meta={
        "command": shlex.join(["python", "-m", "benchmarks.resilience_overhead", *given]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "load_average_at_start": os.getloadavg(),
        "settings": {"rounds": settings.rounds, "seconds": settings.seconds,
                     "warmup_seconds": settings.warmup_seconds},
        "commands": {spec.name: shlex.join(spec.command(rundir)) for spec in proxies},
        "versions": {BEFORE: version_of(before), "after": version_of(after)},
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
    text = render(store.data)
    TABLE.write_text(text + "\n")
    print(f"\n{text}\n(written to {TABLE})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
