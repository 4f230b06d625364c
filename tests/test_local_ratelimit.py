"""Envoy's HTTP local rate limit filter on both data planes, from the same bootstrap: listener-wide,
per virtual host and per route (typed_per_filter_config), descriptors chosen by a request header,
shadow mode, per-connection buckets, a custom status with response headers, and refill.

Counts are what a client sees (how many of a fast burst pass, how many get the local reply) and
the filter's stats: Envoy's <stat_prefix>.http_local_rate_limit.{enabled,enforced,rate_limited,ok},
meshctl's meshctl_http_local_rate_limit_{...}_total{stat_prefix=...}."""

from __future__ import annotations

import re
import time
import urllib.request

import pytest

from helpers import bootstrap as b
from helpers.counting_app import CountingApp
from helpers.http_client import Http1Client
from helpers.ports import free_port

LRL_TYPE = "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"
LRL_NAME = "envoy.filters.http.local_ratelimit"
ALL = {"default_value": {"numerator": 100, "denominator": "HUNDRED"}, "runtime_key": "lrl_enabled"}


def lrl(stat_prefix: str, max_tokens: int | None = None, *, per_fill: int = 1, interval: str = "1s",
        enforced: bool = True, **extra) -> dict:
    config = {"@type": LRL_TYPE, "stat_prefix": stat_prefix, "filter_enabled": ALL, **extra}
    if enforced:
        config["filter_enforced"] = ALL
    if max_tokens is not None:
        config["token_bucket"] = {"max_tokens": max_tokens, "tokens_per_fill": per_fill, "fill_interval": interval}
    return config  # fmt: skip


def serve(dataplane, app: CountingApp, route_config: dict, filter_config: dict | None) -> tuple[int, "Stats"]:
    port, admin = free_port(), free_port()
    listener = b.http_listener("http", port, route_config)
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    if filter_config is not None:
        hcm["http_filters"].insert(0, {"name": LRL_NAME, "typed_config": filter_config})
    config = b.bootstrap([listener], [b.cluster("upstream", app.port)])
    config["admin"] = {"address": b.socket_address(admin)}
    process = dataplane(config)
    return port, Stats(process.name, admin)


def one_route(**route_extra) -> dict:
    route = b.route("upstream")
    route.update(route_extra)
    return b.route_configuration("local", [b.virtual_host("all", [route])])


class Stats:
    """One data plane's local rate limit counters for a stat_prefix."""

    def __init__(self, kind: str, admin_port: int) -> None:
        self.kind, self.admin_port = kind, admin_port

    def read(self, prefix: str) -> dict[str, int]:
        names = ("enabled", "enforced", "rate_limited", "ok")
        if self.kind == "meshctl":
            text = self._get("/stats/prometheus")
            out = {}
            for name in names:
                series = f'meshctl_http_local_rate_limit_{name}_total{{stat_prefix="{prefix}"}}'
                found = re.search(rf"^{re.escape(series)} (\d+)$", text, re.MULTILINE)
                out[name] = int(found.group(1)) if found else 0
            return out
        stats = dict(line.split(": ", 1) for line in self._get("/stats").splitlines() if ": " in line)
        return {name: int(stats.get(f"{prefix}.http_local_rate_limit.{name}", 0)) for name in names}

    def flag_rl(self) -> int | None:
        if self.kind != "meshctl":
            return None
        text = self._get("/stats/prometheus")
        found = re.search(r'^meshctl_downstream_rq_response_flags_total\{listener="http",flag="RL"\} (\d+)$', text, re.MULTILINE)
        return int(found.group(1)) if found else 0

    def _get(self, path: str) -> str:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5) as response:
            return response.read().decode()


@pytest.fixture
def app():
    server = CountingApp()
    yield server
    server.stop()


def burst(port: int, n: int, path: str = "/", headers: list[tuple[str, str]] | None = None, client: Http1Client | None = None):
    own = client is None
    client = client or Http1Client(port)
    try:
        return [client.get(path, headers) for _ in range(n)]
    finally:
        if own:
            client.close()


def statuses(responses) -> list[int]:
    return [r.status for r in responses]


def test_listener_wide_bucket_limits_a_burst_and_refills(dataplane, app):
    port, stats = serve(dataplane, app, one_route(), lrl("lrl", 5))
    responses = burst(port, 12)
    assert statuses(responses) == [200] * 5 + [429] * 7
    limited = responses[-1]
    assert limited.body == b"local_rate_limited"
    # Envoy's docs say the filter sets x-envoy-ratelimited; Envoy 1.40 does not (only the global
    # ratelimit filter does), and neither does meshctl.
    assert "x-envoy-ratelimited" not in limited.headers
    assert app.snapshot().requests == 5
    # One token per second: after a little more than a second, one more passes.
    time.sleep(1.15)
    assert statuses(burst(port, 3)) == [200, 429, 429]
    assert stats.read("lrl") == {"enabled": 15, "enforced": 9, "rate_limited": 9, "ok": 6}
    assert stats.flag_rl() in (None, 9)


def test_per_virtual_host_and_per_route_configs_win_and_own_their_buckets(dataplane, app):
    vhost_config = lrl("vhost", 3)
    route_config = lrl("route", 2)
    limited_host = b.virtual_host(
        "limited",
        [{**b.route("upstream", "/own"), "typed_per_filter_config": {LRL_NAME: route_config}},
         b.route("upstream", "/shared"),
         b.route("upstream", "/other")],
        domains=["limited"],
        typed_per_filter_config={LRL_NAME: vhost_config},
    )  # fmt: skip
    free_host = b.virtual_host("free", [b.route("upstream")], domains=["*"])
    config = b.route_configuration("local", [limited_host, free_host])
    # The connection manager's filter has no bucket: on its own it limits nothing.
    port, stats = serve(dataplane, app, config, {"@type": LRL_TYPE, "stat_prefix": "listener"})
    host = [("host", "limited")]
    assert statuses(burst(port, 4, "/own", host)) == [200, 200, 429, 429]
    # The virtual host's bucket is shared by its routes without their own config.
    assert statuses(burst(port, 2, "/shared", host) + burst(port, 3, "/other", host)) == [200, 200, 200, 429, 429]
    assert statuses(burst(port, 10, "/", [("host", "elsewhere")])) == [200] * 10
    assert stats.read("route") == {"enabled": 4, "enforced": 2, "rate_limited": 2, "ok": 2}
    assert stats.read("vhost") == {"enabled": 5, "enforced": 2, "rate_limited": 2, "ok": 3}
    assert stats.read("listener")["enabled"] == 0


def test_a_header_descriptor_selects_a_tighter_bucket_and_the_default_still_pays(dataplane, app):
    config = lrl("desc", 10, descriptors=[
        {"entries": [{"key": "tier", "value": "free"}], "token_bucket": {"max_tokens": 2, "fill_interval": "60s"}},
    ])  # fmt: skip
    tier = {"actions": [{"request_headers": {"header_name": "x-tier", "descriptor_key": "tier"}}]}
    routes = b.route_configuration("local", [b.virtual_host("all", [b.route("upstream", rate_limits=[tier])])])
    port, stats = serve(dataplane, app, routes, config)
    assert statuses(burst(port, 5, "/", [("x-tier", "free")])) == [200, 200, 429, 429, 429]
    # Another value matches no descriptor: the default bucket (10, of which the free tier took 2).
    assert statuses(burst(port, 5, "/", [("x-tier", "gold")])) == [200] * 5
    assert statuses(burst(port, 4)) == [200, 200, 200, 429]
    assert stats.read("desc") == {"enabled": 14, "enforced": 4, "rate_limited": 4, "ok": 10}


def test_shadow_mode_passes_everything_and_counts_what_it_would_limit(dataplane, app):
    config = lrl("shadow", 2, enforced=False, request_headers_to_add_when_not_enforced=[
        {"header": {"key": "x-would-be-limited", "value": "yes"}},
    ])  # fmt: skip
    port, stats = serve(dataplane, app, one_route(), config)
    assert statuses(burst(port, 8)) == [200] * 8
    assert app.snapshot().requests == 8
    marked = [h.get("x-would-be-limited") for h in app.headers_seen]
    assert marked == [None, None] + ["yes"] * 6
    assert stats.read("shadow") == {"enabled": 8, "enforced": 0, "rate_limited": 6, "ok": 2}


def test_per_downstream_connection_buckets(dataplane, app):
    port, stats = serve(dataplane, app, one_route(), lrl("perconn", 2, local_rate_limit_per_downstream_connection=True))
    first, second = Http1Client(port), Http1Client(port)
    try:
        assert statuses(burst(port, 4, client=first)) == [200, 200, 429, 429]
        assert statuses(burst(port, 4, client=second)) == [200, 200, 429, 429]
        assert first.connections_opened == second.connections_opened == 1
    finally:
        first.close()
        second.close()
    assert stats.read("perconn")["rate_limited"] == 4


def test_custom_status_and_response_headers(dataplane, app):
    config = lrl("custom", 1, status={"code": "ServiceUnavailable"}, response_headers_to_add=[
        {"header": {"key": "x-local-rate-limit", "value": "true"}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"},
    ])  # fmt: skip
    port, _ = serve(dataplane, app, one_route(), config)
    ok, limited = burst(port, 2)
    assert ok.status == 200 and "x-local-rate-limit" not in ok.headers
    assert limited.status == 503
    assert limited.body == b"local_rate_limited"
    assert limited.headers.get("x-local-rate-limit") == "true"
    assert "x-envoy-ratelimited" not in limited.headers


def test_filter_not_enabled_limits_nothing(dataplane, app):
    config = lrl("off", 1)
    del config["filter_enabled"]
    port, stats = serve(dataplane, app, one_route(), config)
    assert statuses(burst(port, 4)) == [200] * 4
    assert stats.read("off") == {"enabled": 0, "enforced": 0, "rate_limited": 0, "ok": 0}


def test_generic_key_and_header_match_descriptors_with_virtual_host_policies(dataplane, app):
    config = lrl("actions", 100, descriptors=[
        {"entries": [{"key": "generic_key", "value": "a"}], "token_bucket": {"max_tokens": 1, "fill_interval": "60s"}},
        {"entries": [{"key": "header_match", "value": "premium"}], "token_bucket": {"max_tokens": 2, "fill_interval": "60s"}},
    ])  # fmt: skip
    premium = {"actions": [{"header_value_match": {"descriptor_value": "premium", "headers": [{"name": "x-premium", "present_match": True}]}}]}
    route_a = b.route("upstream", "/a", rate_limits=[{"actions": [{"generic_key": {"descriptor_value": "a"}}]}])
    vhost = b.virtual_host("all", [route_a, b.route("upstream", "/b")], rate_limits=[premium])
    port, _ = serve(dataplane, app, b.route_configuration("local", [vhost]), config)
    flagged = [("x-premium", "1")]
    # /a has its own policy, so the virtual host's is not used (vh_rate_limits OVERRIDE).
    assert statuses(burst(port, 3, "/a", flagged)) == [200, 429, 429]
    assert statuses(burst(port, 3, "/b", flagged)) == [200, 200, 429]
    assert statuses(burst(port, 3, "/b")) == [200, 200, 200]


@pytest.mark.parametrize("exhausted", [False, True], ids=["unavailable", "resource-exhausted"])
def test_grpc_requests_get_a_grpc_status(dataplane, app, exhausted):
    port, _ = serve(dataplane, app, one_route(), lrl("grpc", 1, rate_limited_as_resource_exhausted=exhausted))
    grpc = [("content-type", "application/grpc"), ("te", "trailers")]
    ok, limited = burst(port, 2, "/pkg.Service/Method", grpc)
    assert ok.status == 200
    assert limited.status == 200
    assert limited.headers.get("grpc-status") == ("8" if exhausted else "14")
    assert limited.headers.get("grpc-message") == "local_rate_limited"


def test_remote_address_descriptor_takes_the_client_from_x_forwarded_for(dataplane, app):
    # Without use_remote_address Envoy takes the client's address from x-forwarded-for's last entry.
    config = lrl("remote", 100, descriptors=[
        {"entries": [{"key": "remote_address", "value": "10.1.2.3"}], "token_bucket": {"max_tokens": 1, "fill_interval": "60s"}},
    ])  # fmt: skip
    vhost = b.virtual_host("all", [b.route("upstream", rate_limits=[{"actions": [{"remote_address": {}}]}])])
    port, _ = serve(dataplane, app, b.route_configuration("local", [vhost]), config)
    assert statuses(burst(port, 2, "/", [("x-forwarded-for", "192.0.2.9, 10.1.2.3")])) == [200, 429]
    assert statuses(burst(port, 2, "/", [("x-forwarded-for", "10.1.2.3, 192.0.2.9")])) == [200, 200]
    assert statuses(burst(port, 2)) == [200, 200]


def two_instances(dataplane, app, first_tokens: int) -> tuple[int, Stats]:
    """Two local rate limit filters in one connection manager (the first with `first_tokens`, the
    second, named `second`, with 3); /tight has a route config for `second` (1 token), /ignored one
    keyed by a name no filter has."""
    routes = b.route_configuration("local", [b.virtual_host("all", [
        {**b.route("upstream", "/tight"), "typed_per_filter_config": {"second": lrl("second-route", 1)}},
        {**b.route("upstream", "/ignored"), "typed_per_filter_config": {"nobody": lrl("nobody", 1)}},
        b.route("upstream", "/"),
    ])])  # fmt: skip
    port, admin = free_port(), free_port()
    listener = b.http_listener("http", port, routes)
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"][:0] = [
        {"name": LRL_NAME, "typed_config": lrl("first", first_tokens)},
        {"name": "second", "typed_config": lrl("second", 3)},
    ]
    config = b.bootstrap([listener], [b.cluster("upstream", app.port)])
    config["admin"] = {"address": b.socket_address(admin)}
    stats = Stats(dataplane(config).name, admin)
    return port, stats


def test_two_instances_run_in_order_with_their_own_buckets_and_route_configs_by_name(dataplane, app):
    """Two local rate limit filters in one connection manager: each has its own buckets, the
    second sees only what the first let through, and a route's typed_per_filter_config reaches
    the instance its key names (a key naming no filter changes nothing)."""
    port, stats = two_instances(dataplane, app, first_tokens=5)
    # The first passes 5 of 8; the second 3 of those 5.
    assert statuses(burst(port, 8)) == [200] * 3 + [429] * 5
    assert stats.read("first") == {"enabled": 8, "enforced": 3, "rate_limited": 3, "ok": 5}
    assert stats.read("second") == {"enabled": 5, "enforced": 2, "rate_limited": 2, "ok": 3}
    # Both buckets are empty now: the first refuses everything, whatever the route says.
    assert statuses(burst(port, 2, "/tight")) == [429, 429]
    assert stats.read("second-route")["enabled"] == 0
    assert stats.read("nobody")["enabled"] == 0
    assert app.snapshot().requests == 3


def test_a_route_config_keyed_by_the_second_instance_name_replaces_only_its_config(dataplane, app):
    port, stats = two_instances(dataplane, app, first_tokens=100)
    assert statuses(burst(port, 3, "/tight")) == [200, 429, 429]
    # A key naming no filter instance is ignored: the second filter's own bucket (3) decides.
    assert statuses(burst(port, 4, "/ignored")) == [200, 200, 200, 429]
    assert stats.read("second-route") == {"enabled": 3, "enforced": 2, "rate_limited": 2, "ok": 1}
    assert stats.read("second") == {"enabled": 4, "enforced": 1, "rate_limited": 1, "ok": 3}
    assert stats.read("nobody")["enabled"] == 0
    assert stats.read("first")["ok"] == 7
