"""Per-rule counts of local RateLimit rules end to end: `meshctl serve`, a `meshctl run` client
sidecar holding a RateLimit with an enforced and a shadow rule, a burst over both limits; the
sidecar reports its engine's per-rule counts with each lease renewal, and `meshctl get ratelimit
-o yaml` and `meshctl ratelimit show` (run as a user would) show what each rule did in the last
minute, mesh-wide."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import pytest
import yaml
from helpers.control_plane import start_control_plane
from helpers.envoy_sidecar import admin_get
from helpers.mesh import wait_until
from test_istio_tasks import Mesh
from test_rate_limit_e2e import get, limited, rate_limit

ENFORCED, SHADOW, BURST = 5, 3, 12
ENFORCED_AND_SHADOW = rate_limit(f"""
  - limit: {{requests: {ENFORCED}, unit: minute}}
  - match: {{method: GET, headers: {{x-user: {{prefix: j}}}}}}
    limit: {{requests: {SHADOW}, unit: minute}}
    shadow: true
""")
# The client sidecar's lease (tests/helpers/mesh.py): it renews, and reports, every third of it.
RENEWAL = 3.0 / 3


@pytest.fixture
def mesh(tmp_path):
    mesh = Mesh(start_control_plane(tmp_path / "plane"), tmp_path)
    yield mesh
    mesh.stop()


def local_rules(mesh: Mesh) -> list[dict]:
    shown = mesh.plane.meshctl("get", "ratelimit", "reviews-limit", "-o", "yaml")
    assert shown.returncode == 0, shown.stderr
    return yaml.safe_load(shown.stdout)["status"].get("localRules", [])


def test_get_and_ratelimit_show_give_each_local_rules_allowed_and_limited_in_the_last_minute(mesh):
    client = limited(mesh, "meshctl", ENFORCED_AND_SHADOW)
    before = local_rules(mesh)
    assert [(r["rule"], r["limit"], r["allowedLastMinute"], r["limitedLastMinute"]) for r in before] == [
        (0, f"{ENFORCED} per minute", 0, 0), (1, f"{SHADOW} per minute", 0, 0)]
    statuses = [get(client, {"x-user": "jason"}).status for _ in range(BURST)]
    sent = time.monotonic()
    assert statuses == [200] * ENFORCED + [429] * (BURST - ENFORCED)
    # The engine's own series, per descriptor (the shadow instance counts what it would have limited).
    metrics = admin_get(client.admin_port, "/stats/prometheus")
    for prefix, allowed, limited_ in (("local_rate_limit", ENFORCED, BURST - ENFORCED),
                                      ("local_rate_limit_shadow", SHADOW, BURST - SHADOW)):  # fmt: skip
        rule = "0" if prefix == "local_rate_limit" else "1"
        for outcome, count in (("allowed", allowed), ("limited", limited_)):
            series = (f'meshctl_http_local_rate_limit_descriptor_total{{stat_prefix="{prefix}",'
                      f'descriptor="meshctl_rate_limit=default/reviews-limit/{rule}",outcome="{outcome}"}} {count}')
            assert series in metrics.splitlines(), metrics

    expected = [
        {"rule": 0, "limit": f"{ENFORCED} per minute", "allowedLastMinute": ENFORCED,
         "limitedLastMinute": BURST - ENFORCED, "sidecars": 1},
        {"rule": 1, "limit": f"{SHADOW} per minute", "allowedLastMinute": SHADOW,
         "limitedLastMinute": BURST - SHADOW, "sidecars": 1},
    ]  # fmt: skip
    shown: list = []

    def counted() -> bool | list:
        nonlocal shown
        shown = local_rules(mesh)
        return [{k: v for k, v in r.items() if k != "requestsPerSecond"} for r in shown] == expected or shown

    # Within two renewals (one may have been on its way as the burst ended), and a CLI call.
    took = wait_until(counted, 2 * RENEWAL + 3, "the plane shows the burst's counts per rule", step=0.2)
    print(f"shown {time.monotonic() - sent:.1f}s after the burst ({took:.1f}s of waiting): {shown}")
    assert all(r["requestsPerSecond"] >= 0 for r in shown)

    table = mesh.plane.meshctl("ratelimit", "show", "reviews-limit")
    print(table.stdout)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["RATELIMIT", "RULE", "SCOPE", "MATCH", "LIMIT", "ALLOWED/1m", "LIMITED/1m", "RATE/s"]
    assert re.match(rf"default/reviews-limit\s+0\s+local\s+\*\s+{ENFORCED}/minute\s+{ENFORCED}\s+{BURST - ENFORCED}\s+\d", lines[1]), lines
    assert re.match(rf"default/reviews-limit\s+1\s+local shadow\s+GET x-user\^=j\s+{SHADOW}/minute\s+{SHADOW}"
                    rf"\s+{BURST - SHADOW}\s+\d", lines[2]), lines  # fmt: skip
    # Every RateLimit of the namespace: the same rows (but the rate, live: it falls to 0 meanwhile).
    every = mesh.plane.meshctl("ratelimit", "show").stdout.splitlines()[1:]
    assert [line.rsplit(None, 1)[0] for line in every] == [line.rsplit(None, 1)[0] for line in lines[1:]]


    # --watch: the table again every half second, until Ctrl-C (SIGINT), which ends it cleanly.
    watching = subprocess.Popen([sys.executable, "-m", "meshctl", "ratelimit", "show", "--watch", "0.5"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=mesh.plane.env)  # fmt: skip
    try:
        time.sleep(3.0)
    finally:
        watching.send_signal(signal.SIGINT)  # this PID only
        out, err = watching.communicate(timeout=10)
    assert watching.returncode == 0, err
    assert out.count("RATELIMIT  ") >= 2 and "every 0.5s, Ctrl-C to stop" in out, out


def test_ratelimit_show_of_a_missing_ratelimit_says_so_and_exits_4(mesh):
    shown = mesh.plane.meshctl("ratelimit", "show", "nothing-here")
    assert shown.returncode == 4, (shown.stdout, shown.stderr)
    assert "meshctl ratelimit show: RateLimit default/nothing-here not found" in shown.stderr
    assert shown.stdout == ""
    empty = mesh.plane.meshctl("ratelimit", "show", "-n", "shop")
    assert empty.returncode == 0 and empty.stdout.strip() == "no RateLimit in namespace shop"
