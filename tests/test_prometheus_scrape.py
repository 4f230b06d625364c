"""A real Prometheus (Debian's) scraping a small mesh: `meshctl serve --prometheus-file-sd` keeps the
targets file, `meshctl prometheus-config --use-file-sd` writes Prometheus's config, and a client
sidecar's traffic to two versions of reviews shows in PromQL per target label (app, version, pod);
instances that leave or die drop out of the file and out of Prometheus's targets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import yaml
from helpers.control_plane import start_control_plane
from helpers.mesh import MeshSidecar, ask_host, echo_instance, stop_all, wait_until
from helpers.prometheus_server import start_prometheus

LEASE = 2.0
REQUESTS = 40


def file_sd_pods(path) -> dict[str, dict[str, str]]:
    """pod → labels, as the file_sd file lists them now."""
    if not path.exists():
        return {}
    return {group["labels"]["pod"]: group["labels"] for group in json.loads(path.read_text())}


def value(sample: dict) -> float:
    return float(sample["value"][1])


def direction(cluster: str) -> str:
    return cluster.split("|", 1)[0]


def by_direction(prometheus) -> dict[tuple[str, str, str], float]:
    """meshctl_upstream_rq_total summed per (app, version, inbound|outbound), as Prometheus has it."""
    summed: Counter = Counter()
    for sample in prometheus.query("sum by (app, version, cluster) (meshctl_upstream_rq_total)"):
        labels = sample["metric"]
        summed[labels["app"], labels["version"], direction(labels["cluster"])] += value(sample)
    return {key: count for key, count in summed.items() if count}


def wait_until_scraped(prometheus, served: dict[str, Counter]) -> Counter:
    """Wait until Prometheus's meshctl_upstream_rq_total of each pod equals what it serves
    (`served`: pod → per-cluster counts read from its admin endpoint); the sums by_direction keys."""
    def scraped() -> bool | list:
        samples = prometheus.query("meshctl_upstream_rq_total")
        got = {(s["metric"]["pod"], s["metric"]["cluster"]): value(s) for s in samples}
        want = {(pod, cluster): float(n) for pod, counts in served.items() for cluster, n in counts.items()}
        return got == want or sorted(set(got.items()) ^ set(want.items()))

    wait_until(scraped, 10, "Prometheus holds what the sidecars serve", 0.25)
    return Counter(by_direction(prometheus))


def test_prometheus_scrapes_every_registered_sidecar_and_sees_the_traffic_per_target(tmp_path):
    started = time.monotonic()
    targets = tmp_path / "targets.json"
    plane = start_control_plane(tmp_path / "plane", "--prometheus-file-sd", str(targets))
    sidecars: list[MeshSidecar] = []
    prometheus = None
    try:
        v1 = echo_instance(plane.env, tmp_path, "reviews", "v1", lease=LEASE)
        v2 = echo_instance(plane.env, tmp_path, "reviews", "v2", lease=LEASE)
        client = MeshSidecar(plane.env, tmp_path, "productpage", "--version", "v1", lease=LEASE)
        sidecars += [v1, v2, client]

        wait_until(lambda: len(file_sd_pods(targets)) == 3 or file_sd_pods(targets), 20, "3 targets in the file", 0.1)
        pods = file_sd_pods(targets)
        by_workload = {(labels["app"], labels.get("version")): pod for pod, labels in pods.items()}
        assert set(by_workload) == {("reviews", "v1"), ("reviews", "v2"), ("productpage", "v1")}, pods
        assert all(labels["namespace"] == "default" for labels in pods.values())

        config = plane.meshctl("prometheus-config", "--use-file-sd", str(targets), "--scrape-interval", "1s")
        assert config.returncode == 0, config.stderr
        prometheus = start_prometheus(tmp_path / "prometheus", config.stdout)

        def all_up() -> bool | list:
            up = prometheus.query('up{job="meshctl-sidecars"}')
            return sorted((s["metric"]["pod"], value(s)) for s in up) == sorted((pod, 1.0) for pod in pods) or up

        wait_until(all_up, 15, "Prometheus scrapes the 3 sidecars, all up", 0.25)

        # Both the printed config's static targets and `--file-sd` give what serve keeps in the file.
        listed = yaml.safe_load(plane.meshctl("prometheus-config").stdout)["scrape_configs"][0]["static_configs"]
        assert listed == json.loads(targets.read_text())
        written = plane.meshctl("prometheus-config", "--file-sd", str(tmp_path / "once.json"))
        assert written.returncode == 0 and "3 targets written" in written.stderr, written.stderr
        assert json.loads((tmp_path / "once.json").read_text()) == listed

        wait_until(lambda: ask_host(client.outbound_port) in ("v1", "v2"), 20, "reviews answers", 0.1)
        # What Prometheus holds before the counted traffic: exactly what each sidecar serves now.
        before = wait_until_scraped(prometheus, {pod: sidecar.upstream_requests() for pod, sidecar in
                                                 ((by_workload[("reviews", "v1")], v1), (by_workload[("reviews", "v2")], v2),
                                                  (by_workload[("productpage", "v1")], client))})  # fmt: skip
        answers = Counter(ask_host(client.outbound_port) for _ in range(REQUESTS))
        print(f"answers: {dict(answers)}")
        assert set(answers) == {"v1", "v2"}, answers  # round robin over both: every request answered

        # The caller's outbound requests, and each version's inbound ones, per target label.
        expected = {
            ("productpage", "v1", "outbound"): before["productpage", "v1", "outbound"] + REQUESTS,
            ("reviews", "v1", "inbound"): before["reviews", "v1", "inbound"] + answers["v1"],
            ("reviews", "v2", "inbound"): before["reviews", "v2", "inbound"] + answers["v2"],
        }  # fmt: skip
        wait_until(lambda: by_direction(prometheus) == expected or by_direction(prometheus), 10,
                   "Prometheus counts the traffic per app, version and direction", 0.25)  # fmt: skip
        rates = prometheus.query('sum by (version) (rate(meshctl_upstream_rq_total{app="reviews", cluster=~"inbound.*"}[10s]))')
        assert sorted(s["metric"]["version"] for s in rates if value(s) > 0) == ["v1", "v2"], rates

        # An instance that leaves (SIGTERM: it deregisters), then one that dies (its lease runs out).
        for sidecar, signal_, version, bound in ((v2, signal.SIGTERM, "v2", 5.0), (v1, signal.SIGKILL, "v1", 2 * LEASE + 2)):
            pod = by_workload[("reviews", version)]
            stopped = time.monotonic()
            sidecar.stop(signal_)
            wait_until(lambda pod=pod: pod not in file_sd_pods(targets), bound, f"reviews {version} leaves the file", 0.1)
            left = time.monotonic() - stopped
            # Prometheus's discovery manager passes target changes on at most every 5 s.
            wait_until(lambda pod=pod: pod not in {t["labels"]["pod"] for t in prometheus.active_targets()}, 5 + 3,
                       f"Prometheus drops reviews {version}", 0.1)  # fmt: skip
            print(f"reviews {version} ({signal_.name}): out of the file after {left:.1f}s, "
                  f"out of Prometheus's targets after {time.monotonic() - stopped:.1f}s")
        assert set(file_sd_pods(targets)) == {by_workload[("productpage", "v1")]}
    finally:
        if prometheus is not None:
            print(f"--- prometheus ---\n{prometheus.log()[-3000:]}")
            prometheus.stop()
        stop_all(sidecars, plane)
        print(f"took {time.monotonic() - started:.1f}s")


def test_serve_refuses_a_file_sd_path_it_cannot_write_before_it_serves(tmp_path):
    # Wide: typer boxes its errors at the terminal width, and would break the path.
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data"), "COLUMNS": "300"}
    for path, reason in ((tmp_path / "missing" / "targets.json", "no such file or directory"),
                         (tmp_path, "is a directory")):  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-m", "meshctl", "serve", "--api-port", "0", "--xds-port", "0",
             "--prometheus-file-sd", str(path)],
            capture_output=True, text=True, env=env, timeout=30, check=False,
        )  # fmt: skip
        assert done.returncode == 2, done.stderr
        assert "--prometheus-file-sd" in done.stderr and str(path) in done.stderr and reason in done.stderr.lower(), done.stderr
        assert "ready" not in done.stderr
