"""Prometheus targets from the registry: labels as Istio's Prometheus setup gives them, the generated
config as Prometheus parses it (`promtool check config` when installed), and the file_sd file
`meshctl serve --prometheus-file-sd` keeps: rewritten on registry changes only, whole (renamed);
`meshctl prometheus-config`'s bad options refused by name."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import trio
import yaml
from meshctl.control.prometheus_file_sd import check_writable, keep_file_sd
from meshctl.control.prometheus_targets import file_sd_groups, label_name, scrape_config
from meshctl.control.registry import Registry, Sidecar

REVIEWS_V2 = Sidecar(
    node_id="reviews.shop-1a2b", service="reviews", namespace="shop", version="v2",
    labels={"app.kubernetes.io/part-of": "bookinfo", "pod": "forged", "__address__": "evil:1", "": "x", "..": "y"},
    metrics_address="127.0.0.1:15020", admin_port=15000,
)  # fmt: skip


def test_each_sidecar_is_a_target_labelled_app_version_namespace_pod_and_its_own_labels():
    old_agent = Sidecar(node_id="ratings-1", service="ratings", admin_port=17000).as_json()
    no_admin = Sidecar(node_id="client-1", service="client").as_json()
    assert file_sd_groups([REVIEWS_V2.as_json(), old_agent, no_admin]) == [
        # Sorted by node id. An agent older than metricsAddress: its admin port, on loopback.
        {"targets": ["127.0.0.1:17000"], "labels": {"app": "ratings", "namespace": "default", "pod": "ratings-1"}},
        {"targets": ["127.0.0.1:15020"], "labels": {
            "app": "reviews", "app_kubernetes_io_part_of": "bookinfo", "namespace": "shop",
            "pod": "reviews.shop-1a2b",  # a workload label cannot forge it, nor set Prometheus's own
            "version": "v2"}},
    ]  # fmt: skip
    assert label_name("9lives") == "_9lives"


def test_the_config_lists_the_targets_or_reads_a_file_sd_file(tmp_path):
    static = yaml.safe_load(scrape_config(groups=file_sd_groups([REVIEWS_V2.as_json()]), scrape_interval="1s"))
    (job,) = static["scrape_configs"]
    assert static["global"]["scrape_interval"] == "1s"
    assert job["metrics_path"] == "/stats/prometheus"
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:15020"]
    from_file = yaml.safe_load(scrape_config(file_sd_path=str(tmp_path / "targets.json")))
    assert from_file["scrape_configs"][0]["file_sd_configs"][0]["files"] == [str(tmp_path / "targets.json")]
    if shutil.which("promtool") is None:
        return  # Debian's prometheus brings it (scripts/test.sh installs it)
    for text in (scrape_config(groups=file_sd_groups([REVIEWS_V2.as_json()])),
                 scrape_config(file_sd_path=str(tmp_path / "targets.json"), scrape_interval="1s")):  # fmt: skip
        (tmp_path / "prometheus.yml").write_text(text)
        checked = subprocess.run(["promtool", "check", "config", str(tmp_path / "prometheus.yml")],
                                 capture_output=True, text=True, check=False)  # fmt: skip
        assert checked.returncode == 0, checked.stdout + checked.stderr


def test_check_writable_refuses_a_missing_directory_and_a_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        check_writable(tmp_path / "missing" / "targets.json")
    with pytest.raises(IsADirectoryError):
        check_writable(tmp_path)
    check_writable(tmp_path / "targets.json")
    assert list(tmp_path.iterdir()) == []  # the probe leaves nothing behind


async def test_the_file_follows_registrations_and_is_rewritten_only_when_targets_change(tmp_path):
    path = tmp_path / "targets.json"
    registry = Registry()
    writes: list[tuple[int, int]] = []

    def targets() -> list[str]:
        return [group["labels"]["pod"] for group in json.loads(path.read_text())]

    async def changed(expected: list[str]) -> None:
        with trio.fail_after(2):
            while not path.exists() or targets() != expected:
                await trio.sleep(0.01)
        writes.append((path.stat().st_ino, path.stat().st_mtime_ns))

    async with trio.open_nursery() as nursery:
        assert await nursery.start(keep_file_sd, registry, path) == f"Prometheus file_sd targets in {path}"
        await changed([])
        registry.register(REVIEWS_V2)
        await changed([REVIEWS_V2.node_id])
        registry.register(Sidecar(node_id="ratings-1", service="ratings", metrics_address="127.0.0.1:15021"))
        await changed(["ratings-1", REVIEWS_V2.node_id])  # sorted by node id
        # A readiness change bumps the registry, yet the targets stay: the file is not rewritten.
        registry.set_ready("ratings-1", True)
        await trio.sleep(0.1)
        assert (path.stat().st_ino, path.stat().st_mtime_ns) == writes[-1]
        registry.deregister(REVIEWS_V2.node_id)
        await changed(["ratings-1"])
        nursery.cancel_scope.cancel()
    assert oct(path.stat().st_mode & 0o777) == "0o644"  # readable by a Prometheus of another user
    assert [p.name for p in tmp_path.iterdir()] == ["targets.json"]  # no temporary file left


def test_prometheus_config_refuses_bad_options_by_name(tmp_path):
    # Wide: typer boxes its errors at the terminal width.
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path), "COLUMNS": "300"}

    def meshctl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "meshctl", "prometheus-config", *args],
                              capture_output=True, text=True, env=env, timeout=30, check=False)  # fmt: skip

    for args, option, reason in (
        (["--scrape-interval", "5q", "--use-file-sd", "t.json"], "--scrape-interval", "'5q' is not a duration"),
        (["--file-sd", str(tmp_path / "t.json"), "--use-file-sd", "t.json"], "--file-sd", "give one"),
        (["--use-file-sd", " "], "--use-file-sd", "an empty path"),
    ):
        done = meshctl(*args)
        assert done.returncode == 2 and f"Invalid value for {option}" in done.stderr and reason in done.stderr, done.stderr
    assert list(tmp_path.iterdir()) == []
    unreachable = meshctl("--control-plane", "127.0.0.1:1", "--token", "t", "--file-sd", str(tmp_path / "t.json"))
    assert unreachable.returncode == 1 and "cannot reach the control plane at 127.0.0.1:1" in unreachable.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written
    fine = meshctl("--use-file-sd", "/var/lib/meshctl/targets.json", "--scrape-interval", "1.5s")
    assert fine.returncode == 0, fine.stderr
    assert yaml.safe_load(fine.stdout)["global"]["scrape_interval"] == "1500ms"
