"""Envoy's adaptive concurrency filter on both data planes, from the same bootstrap: a slow app whose
latency grows once it holds more than SLOTS requests, offered CLIENTS (8 × SLOTS) requests at once.
The gradient limit keeps the app near SLOTS, sheds the rest with a fast 503, and the admitted
requests' latency stays bounded; the stats count every shed request.

Stats: Envoy's http.<stat_prefix>.adaptive_concurrency.gradient_controller.{rq_blocked,
concurrency_limit,...}; meshctl's meshctl_http_adaptive_concurrency_{rq_blocked_total,limit,...}
{stat_prefix=...}."""

from __future__ import annotations

import re
import urllib.request

import pytest
from helpers import bootstrap as b
from helpers.overload import SlotApp, overload, p99
from helpers.ports import free_port

AC_TYPE = "type.googleapis.com/envoy.extensions.filters.http.adaptive_concurrency.v3.AdaptiveConcurrency"
SLOTS = 4
SERVICE_SECONDS = 0.1
CLIENTS = 8 * SLOTS
# Why the app holds at most this: the limit L settles where a window's median latency is minRTT ×
# 1.25 (the buffer): L = x + √x with x = 1.25 × SLOTS × minRTT / SERVICE_SECONDS (past SLOTS the
# latency grows as SERVICE_SECONDS × L / SLOTS). With minRTT read as the service time (meshctl:
# ~102 ms) that is 5 + √5 ≈ 7; Envoy 1.40 reads it ~144 ms here (x = 7.2, L ≈ 10). A window also
# judges requests admitted under the previous limit, which overshoots by a few. Half the offered
# concurrency bounds all of it; unprotected, the app would hold all CLIENTS (32).
PEAK_BOUND = CLIENTS // 2
# At most PEAK_BOUND in the app is PEAK_BOUND / SLOTS = 4 service times, + 0.2 s for a busy machine
# (a Python app and clients on two cores): 0.6 s. Seen: meshctl ~0.3 s, Envoy 0.35-0.5 s (its
# higher minRTT lets more in). Unprotected, CLIENTS / SLOTS = 8 service times (0.8 s), and growing
# with every client more.
ADMITTED_P99_BOUND = PEAK_BOUND / SLOTS * SERVICE_SECONDS + 0.2
SECONDS = 5.0


def adaptive_filter(**extra) -> dict:
    return {"name": "envoy.filters.http.adaptive_concurrency", "typed_config": {
        "@type": AC_TYPE,
        "gradient_controller_config": {
            "sample_aggregate_percentile": {"value": 50},
            # Windows several times the app's latency: a window's samples are then mostly of requests
            # admitted under its own limit (at 0.1 s, the limit outruns the latency it measures).
            "concurrency_limit_params": {"max_concurrency_limit": 100, "concurrency_update_interval": "0.5s"},
            # One minimum-RTT measurement at the start (20 requests at min_concurrency 3): the test
            # runs for a few seconds, the next would come after 60 s.
            "min_rtt_calc_params": {"interval": "60s", "request_count": 20, "jitter": {"value": 0}},
        },
        **extra,
    }}  # fmt: skip


class Stats:
    """One data plane's adaptive concurrency stats for the connection manager `ingress_http`."""

    def __init__(self, kind: str, admin_port: int) -> None:
        self.kind, self.admin_port = kind, admin_port

    def read(self) -> dict[str, int]:
        if self.kind == "meshctl":
            text = self._get("/stats/prometheus")
            names = {"rq_blocked": "rq_blocked_total", "concurrency_limit": "limit", "min_rtt_msecs": "min_rtt_msecs"}
            out = {}
            for name, metric in names.items():
                series = f'meshctl_http_adaptive_concurrency_{metric}{{stat_prefix="ingress_http"}}'
                found = re.search(rf"^{re.escape(series)} (\d+)$", text, re.MULTILINE)
                out[name] = int(found.group(1)) if found else -1
            return out
        stats = dict(line.split(": ", 1) for line in self._get("/stats").splitlines() if ": " in line)
        prefix = "http.ingress_http.adaptive_concurrency.gradient_controller."
        return {name: int(stats.get(prefix + name, -1)) for name in ("rq_blocked", "concurrency_limit", "min_rtt_msecs")}

    def _get(self, path: str) -> str:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5) as response:
            return response.read().decode()


@pytest.fixture
def slot_app():
    app = SlotApp(SLOTS, SERVICE_SECONDS)
    yield app
    app.stop()


def serve(dataplane, app: SlotApp, filter_config: dict) -> tuple[int, Stats]:
    port, admin = free_port(), free_port()
    listener = b.http_listener("http", port, b.route_configuration("local", [b.virtual_host("all", [b.route("upstream")])]))
    listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"].insert(0, filter_config)
    config = b.bootstrap([listener], [b.cluster("upstream", app.port)])
    config["admin"] = {"address": b.socket_address(admin)}
    process = dataplane(config)
    return port, Stats(process.name, admin)


def test_overload_is_shed_fast_at_a_limit_that_follows_the_apps_latency(dataplane, dataplane_kind, slot_app):
    port, stats = serve(dataplane, slot_app, adaptive_filter())
    replies = overload(port, "app", CLIENTS, seconds=SECONDS, pause_after_refusal=0.1)
    seen = stats.read()
    served, shed = replies.seconds(200), replies.seconds(503)
    print(f"{dataplane_kind}: {len(served)} served (p99 {p99(served):.3f}s), {len(shed)} shed "
          f"(p99 {p99(shed) if shed else 0:.3f}s), app peak {slot_app.peak}, stats {seen}")  # fmt: skip
    assert replies.count(200) + replies.count(503) == len(replies.all), "only 200s and 503s"
    assert SLOTS <= slot_app.peak <= PEAK_BOUND
    # The app worked near its capacity: SLOTS per service time, minus the start at min_concurrency.
    assert len(served) >= 0.6 * SLOTS * SECONDS / SERVICE_SECONDS
    assert p99(served) < ADMITTED_P99_BOUND
    assert len(shed) > len(served), "most of the offered load is shed"
    assert p99(shed) < SERVICE_SECONDS / 2, "shed at once, not after waiting for the app"
    assert seen["rq_blocked"] == len(shed)
    assert 3 <= seen["concurrency_limit"] <= PEAK_BOUND
    assert SERVICE_SECONDS * 1000 * 0.9 <= seen["min_rtt_msecs"] <= SERVICE_SECONDS * 1000 * 2


def test_a_disabled_filter_lets_everything_through(dataplane, dataplane_kind, slot_app):
    disabled = adaptive_filter(enabled={"default_value": False, "runtime_key": "ac_enabled"})
    port, stats = serve(dataplane, slot_app, disabled)
    replies = overload(port, "app", 2 * SLOTS, seconds=1.0, pause_after_refusal=0.05)
    assert replies.count(200) == len(replies.all), [status for status, _ in replies.all if status != 200]
    assert slot_app.peak == 2 * SLOTS, "nothing limits the app"
    assert stats.read()["rq_blocked"] == 0
