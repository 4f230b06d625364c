"""Envoy's HTTP global rate limit filter (envoy.filters.http.ratelimit) on both data planes, from
the same bootstrap, against a real gRPC rate limit service (tests/helpers/rls_server.py): how many
requests pass a limit of K for each descriptor action, what the service saw, its headers, failing
open or closed when it is down or slow, and meshctl's quota extension (far fewer calls, the same
limit), which a real Envoy does not use.

Counters: Envoy's cluster.<route target>.ratelimit.{ok,over_limit,error,failure_mode_allowed};
meshctl's meshctl_cluster_ratelimit_{...}_total{cluster=...}."""

from __future__ import annotations

import base64
import re
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import bootstrap as b
from helpers.counting_app import CountingApp
from helpers.http_client import Http1Client
from helpers.mesh import wait_until
from helpers.pki import CertificateAuthority, Leaf, key_pem, pem
from helpers.ports import free_port
from helpers.rls_server import RlsServer

RL_TYPE = "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit"
RL_NAME = "envoy.filters.http.ratelimit"
UPSTREAM_TLS_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
COUNTERS = ("ok", "over_limit", "error", "failure_mode_allowed")


def rl_filter(domain: str = "test", cluster: str = "rls", **extra) -> dict:
    service = {"grpc_service": {"envoy_grpc": {"cluster_name": cluster}}, "transport_api_version": "V3"}
    return {"name": RL_NAME, "typed_config": {"@type": RL_TYPE, "domain": domain, "rate_limit_service": service, **extra}}


class Counters:
    """One data plane's global rate limit counters for the cluster `upstream`."""

    def __init__(self, kind: str, admin_port: int) -> None:
        self.kind, self.admin_port = kind, admin_port

    def read(self, names=COUNTERS + ("quota_admitted",)) -> dict[str, int]:
        if self.kind == "meshctl":
            text = self._get("/stats/prometheus")
            out = {}
            for name in names:
                series = f'meshctl_cluster_ratelimit_{name}_total{{cluster="upstream"}}'
                found = re.search(rf"^{re.escape(series)} (\d+)$", text, re.MULTILINE)
                out[name] = int(found.group(1)) if found else 0
            return out
        stats = dict(line.split(": ", 1) for line in self._get("/stats").splitlines() if ": " in line)
        return {name: int(stats.get(f"cluster.upstream.ratelimit.{name}", 0)) for name in names}

    def flag(self, flag: str) -> int | None:
        if self.kind != "meshctl":
            return None
        text = self._get("/stats/prometheus")
        found = re.search(rf'^meshctl_downstream_rq_response_flags_total\{{listener="http",flag="{flag}"\}} (\d+)$', text, re.MULTILINE)
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


@pytest.fixture
def started_services():
    services: list[RlsServer] = []
    yield services
    for service in services:
        service.stop()


def rls(started_services, **kwargs) -> RlsServer:
    service = RlsServer(**kwargs)
    started_services.append(service)
    return service


def serve(dataplane, app: CountingApp, rls_port: int, rate_limits: list[dict], *, filter_extra: dict | None = None,
          vhost_rate_limits: list[dict] | None = None, hcm: dict | None = None,
          rls_transport_socket: dict | None = None, rls_cluster: str = "rls") -> tuple[int, Counters]:  # fmt: skip
    port, admin = free_port(), free_port()
    vhost_extra = {"rate_limits": vhost_rate_limits} if vhost_rate_limits else {}
    routes = b.route_configuration("local", [b.virtual_host("all", [
        b.route("upstream", "/limited", rate_limits=rate_limits),
        b.route("upstream", "/free"),
    ], **vhost_extra)])  # fmt: skip
    listener = b.http_listener("http", port, routes, **(hcm or {}))
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    manager["http_filters"].insert(0, rl_filter(cluster=rls_cluster, **(filter_extra or {})))
    service_cluster = b.cluster(rls_cluster, rls_port, http2=True)
    if rls_transport_socket is not None:
        service_cluster["transport_socket"] = rls_transport_socket
    config = b.bootstrap([listener], [b.cluster("upstream", app.port), service_cluster])
    config["admin"] = {"address": b.socket_address(admin)}
    process = dataplane(config)
    return port, Counters(process.name, admin)


def burst(port: int, n: int, path: str = "/limited", headers: list[tuple[str, str]] | None = None):
    client = Http1Client(port)
    try:
        return [client.get(path, headers) for _ in range(n)]
    finally:
        client.close()


def statuses(responses) -> list[int]:
    return [r.status for r in responses]


def generic(value: str = "g") -> dict:
    return {"actions": [{"generic_key": {"descriptor_value": value}}]}


def test_a_limit_of_three_passes_three_and_limits_the_rest_with_envoys_reply(dataplane, app, started_services):
    service = rls(started_services, limit=3)
    port, counters = serve(dataplane, app, service.port, [generic()])
    responses = burst(port, 6)
    assert statuses(responses) == [200] * 3 + [429] * 3
    limited = responses[-1]
    assert limited.headers.get("x-envoy-ratelimited") == "true"
    assert app.snapshot().requests == 3
    calls = service.seen()
    assert [(c.domain, c.descriptors) for c in calls] == [("test", [(("generic_key", "g"),)])] * 6
    assert {c.hits_addend for c in calls} == {0}
    assert counters.read(COUNTERS) == {"ok": 3, "over_limit": 3, "error": 0, "failure_mode_allowed": 0}
    assert counters.flag("RL") in (None, 3)


@pytest.mark.parametrize(
    "policy, headers, descriptor",
    [
        ({"actions": [{"request_headers": {"header_name": "x-user", "descriptor_key": "user"}}]},
         [("x-user", "alice")], (("user", "alice"),)),
        ({"actions": [{"header_value_match": {"descriptor_value": "premium", "headers": [{"name": "x-premium", "present_match": True}]}}]},
         [("x-premium", "1")], (("header_match", "premium"),)),
        ({"actions": [{"destination_cluster": {}}]}, [], (("destination_cluster", "upstream"),)),
        ({"actions": [{"remote_address": {}}]}, [("x-forwarded-for", "10.1.2.3")], (("remote_address", "10.1.2.3"),)),
        ({"actions": [{"generic_key": {"descriptor_key": "k", "descriptor_value": "v"}},
                      {"request_headers": {"header_name": "x-user", "descriptor_key": "user"}}]},
         [("x-user", "bob")], (("k", "v"), ("user", "bob"))),
    ],
    ids=["request_headers", "header_value_match", "destination_cluster", "remote_address", "two_actions"],
)  # fmt: skip
def test_each_action_makes_envoys_descriptor_and_the_limit_holds(dataplane, app, started_services, policy, headers, descriptor):
    service = rls(started_services, limit=2)
    port, counters = serve(dataplane, app, service.port, [policy])
    assert statuses(burst(port, 4, headers=headers)) == [200, 200, 429, 429]
    assert [c.descriptors for c in service.seen()] == [[descriptor]] * 4
    assert counters.read(("ok", "over_limit")) == {"ok": 2, "over_limit": 2}


def test_no_descriptor_no_call(dataplane, app, started_services):
    policy = {"actions": [{"request_headers": {"header_name": "x-user", "descriptor_key": "user"}}]}
    service = rls(started_services, limit=0)
    port, counters = serve(dataplane, app, service.port, [policy])
    # No x-user: the policy makes no descriptor; /free has no policy at all.
    assert statuses(burst(port, 3) + burst(port, 3, "/free")) == [200] * 6
    assert service.seen() == []
    assert counters.read(COUNTERS) == dict.fromkeys(COUNTERS, 0)


def test_policies_of_another_stage_make_no_descriptor(dataplane, app, started_services):
    service = rls(started_services, limit=0)
    port, _ = serve(dataplane, app, service.port, [{**generic(), "stage": 1}])
    assert statuses(burst(port, 2)) == [200, 200]
    assert service.seen() == []


def test_a_filter_of_stage_one_takes_the_policies_of_stage_one_only(dataplane, app, started_services):
    """As meshctl's compiler places global rules: stage 1, beside local ones at stage 0."""
    service = rls(started_services, limit=1)
    port, _ = serve(dataplane, app, service.port, [generic("zero"), {**generic("one"), "stage": 1}],
                    filter_extra={"stage": 1})  # fmt: skip
    assert statuses(burst(port, 2)) == [200, 429]
    assert [c.descriptors for c in service.seen()] == [[(("generic_key", "one"),)]] * 2


def test_virtual_host_policies_apply_to_routes_without_their_own(dataplane, app, started_services):
    service = rls(started_services, limit=1)
    port, _ = serve(dataplane, app, service.port, [generic("route")], vhost_rate_limits=[generic("vhost")])
    # /limited has its own policy (the virtual host's is overridden); /free takes the virtual host's.
    assert statuses(burst(port, 2)) == [200, 429]
    assert statuses(burst(port, 2, "/free")) == [200, 429]
    assert [c.descriptors for c in service.seen()] == [[(("generic_key", "route"),)]] * 2 + [[(("generic_key", "vhost"),)]] * 2


def test_the_services_headers_reach_the_client_and_the_upstream(dataplane, app, started_services):
    service = rls(started_services, limit=1, response_headers=[("x-rls", "said-so")], request_headers=[("x-rls-request", "yes")])
    port, _ = serve(dataplane, app, service.port, [generic()])
    allowed, limited = burst(port, 2)
    assert (allowed.status, limited.status) == (200, 429)
    assert allowed.headers.get("x-rls") == "said-so"
    assert limited.headers.get("x-rls") == "said-so"
    assert [h.get("x-rls-request") for h in app.headers_seen] == ["yes"]


def test_custom_rate_limited_status(dataplane, app, started_services):
    service = rls(started_services, limit=0)
    port, _ = serve(dataplane, app, service.port, [generic()], filter_extra={"rate_limited_status": {"code": 503}})
    limited = burst(port, 1)[0]
    assert limited.status == 503
    assert limited.headers.get("x-envoy-ratelimited") == "true"


def closed_port() -> int:
    return free_port()


def test_service_down_fails_open_and_counts_it(dataplane, app):
    port, counters = serve(dataplane, app, closed_port(), [generic()])
    assert statuses(burst(port, 4)) == [200] * 4
    assert counters.read(COUNTERS) == {"ok": 0, "over_limit": 0, "error": 4, "failure_mode_allowed": 4}


def test_service_down_with_failure_mode_deny_answers_500(dataplane, app):
    port, counters = serve(dataplane, app, closed_port(), [generic()], filter_extra={"failure_mode_deny": True})
    responses = burst(port, 3)
    assert statuses(responses) == [500] * 3
    assert "x-envoy-ratelimited" not in responses[0].headers
    assert app.snapshot().requests == 0
    assert counters.read(COUNTERS) == {"ok": 0, "over_limit": 0, "error": 3, "failure_mode_allowed": 0}
    assert counters.flag("RLSE") in (None, 3)


@pytest.mark.parametrize("deny", [False, True], ids=["fail-open", "failure-mode-deny"])
def test_a_slow_service_times_out_at_the_configured_timeout(dataplane, app, started_services, deny):
    service = rls(started_services, limit=0, delay=1.0)
    port, counters = serve(dataplane, app, service.port, [generic()], filter_extra={"timeout": "0.2s", "failure_mode_deny": deny})
    started = time.monotonic()
    responses = burst(port, 2)
    elapsed = time.monotonic() - started
    # A limit of 0 would refuse both: the answer came too late to count.
    assert statuses(responses) == ([500, 500] if deny else [200, 200])
    assert 0.35 < elapsed < 1.5, elapsed
    assert counters.read(("error",)) == {"error": 2}


def test_a_timeout_long_enough_waits_for_the_answer(dataplane, app, started_services):
    service = rls(started_services, limit=1, delay=0.3)
    port, _ = serve(dataplane, app, service.port, [generic()], filter_extra={"timeout": "2s"})
    assert statuses(burst(port, 2)) == [200, 429]


def test_quota_lets_meshctl_admit_the_limit_with_far_fewer_calls(dataplane, app, started_services, dataplane_kind):
    service = rls(started_services, limit=20, quota=10)
    port, counters = serve(dataplane, app, service.port, [generic()])
    responses = burst(port, 30)
    # Exactly the limit passes on both data planes.
    assert statuses(responses) == [200] * 20 + [429] * 10
    assert app.snapshot().requests == 20
    calls = service.seen()
    if dataplane_kind == "envoy":
        # Envoy ignores quota: one call per request.
        assert len(calls) == 30
        assert all("x-meshctl-quota" not in c.metadata for c in calls)
    else:
        # The first call admitted 1 and was granted 10; refills asked ahead in the background (each
        # counted by the service as one request nobody sent, which the sidecar adds to its grant)
        # and calls of requests that found no quota brought the rest; every call after the limit
        # was spent answered OVER_LIMIT (this service grants no refusal quota).
        assert all(c.metadata.get("x-meshctl-quota") == "1" for c in calls)
        found = counters.read(COUNTERS + ("quota_admitted", "quota_refill", "quota_refill_error"))
        assert found["ok"] + found["quota_admitted"] == 20 and found["over_limit"] == 10
        assert found["error"] == found["quota_refill_error"] == 0
        assert found["quota_refill"] >= 1
        assert len(calls) == found["ok"] + found["over_limit"] + found["quota_refill"] <= 14


@pytest.mark.meshctl_only
def test_quota_is_refilled_before_it_runs_out_so_requests_do_not_wait(meshctl_dataplane, app, started_services):
    service = rls(started_services, limit=1000, quota=10)
    port, counters = serve(meshctl_dataplane, app, service.port, [generic()])
    names = COUNTERS + ("quota_admitted", "quota_refill", "quota_refill_error")
    # The first request calls (granted 10); the 6th leaves 5 of them, half: a refill goes out.
    assert statuses(burst(port, 6)) == [200] * 6
    wait_until(lambda: len(service.seen()) == 2 and counters.read(names)["quota_refill"] == 1, 5, "the refill")
    # 5 + 10 + 1 (the refill's own request, counted by the service) are held now: the next 16
    # requests find quota. None of them waits for a call: only refills go out, in the background.
    assert statuses(burst(port, 16)) == [200] * 16
    found = counters.read(names)
    assert found["ok"] == 1 and found["quota_admitted"] == 21 and found["quota_refill_error"] == 0
    assert len(service.seen()) == 1 + found["quota_refill"]


@pytest.mark.meshctl_only
def test_a_failed_refill_loses_no_quota(meshctl_dataplane, app, started_services):
    service = rls(started_services, limit=1000, quota=10)
    port, counters = serve(meshctl_dataplane, app, service.port, [generic()])
    assert statuses(burst(port, 1)) == [200]
    service.stop()
    # The refill asked at the 6th request fails; the grant's other requests still pass.
    assert statuses(burst(port, 10)) == [200] * 10
    wait_until(lambda: counters.read(("quota_refill_error",))["quota_refill_error"] == 1, 5, "the failed refill")
    assert counters.read(("ok", "quota_admitted", "error")) == {"ok": 1, "quota_admitted": 10, "error": 0}
    # Spent: the next request's own call fails, and fails open as Envoy's filter does.
    assert statuses(burst(port, 1)) == [200]
    assert counters.read(("error", "failure_mode_allowed")) == {"error": 1, "failure_mode_allowed": 1}


@pytest.mark.meshctl_only
def test_quota_expires(meshctl_dataplane, app, started_services):
    service = rls(started_services, limit=100, quota=50, quota_seconds=0.5)
    port, counters = serve(meshctl_dataplane, app, service.port, [generic()])
    assert statuses(burst(port, 3)) == [200] * 3
    assert len(service.seen()) == 1
    time.sleep(0.7)
    # The grant ran out: the next request calls again.
    assert statuses(burst(port, 1)) == [200]
    assert len(service.seen()) == 2
    assert counters.read(("quota_admitted",)) == {"quota_admitted": 2}


def test_grpc_requests_limited_get_a_grpc_status(dataplane, app, started_services):
    service = rls(started_services, limit=0)
    port, _ = serve(dataplane, app, service.port, [generic()])
    limited = burst(port, 1, headers=[("content-type", "application/grpc"), ("te", "trailers")])[0]
    assert limited.status == 200
    assert limited.headers.get("grpc-status") == "14"
    assert limited.headers.get("x-envoy-ratelimited") == "true"


@pytest.mark.parametrize("request_type, limited", [("internal", False), ("external", True), ("both", True)])
def test_request_type_with_no_internal_addresses_every_request_is_external(dataplane, app, started_services, request_type, limited):
    """Envoy 1.40 without internal_address_config takes no client as internal, and does not
    believe a client's own x-envoy-internal: "internal" applies to nothing."""
    service = rls(started_services, limit=0)
    port, _ = serve(dataplane, app, service.port, [generic()], filter_extra={"request_type": request_type})
    claims_internal = burst(port, 1, headers=[("x-envoy-internal", "true")])[0]
    plain = burst(port, 1, headers=[("x-forwarded-for", "10.0.0.1")])[0]
    expected = 429 if limited else 200
    assert (claims_internal.status, plain.status) == (expected, expected)
    assert len(service.seen()) == (2 if limited else 0)


def test_the_service_over_tls_by_the_clusters_transport_socket(dataplane, app, started_services):
    ca = CertificateAuthority.root()
    issued = ca.issue(Leaf(dns=["rls.test"]))
    service = rls(started_services, limit=1, tls=(key_pem(issued.key), issued.chain_pem()))
    socket = {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": UPSTREAM_TLS_TYPE,
        "sni": "rls.test",
        "common_tls_context": {
            "alpn_protocols": ["h2"],
            "validation_context": {"trusted_ca": {"inline_bytes": base64.b64encode(pem([ca.cert])).decode()}},
        },
    }}  # fmt: skip
    port, counters = serve(dataplane, app, service.port, [generic()], rls_transport_socket=socket)
    assert statuses(burst(port, 3)) == [200, 429, 429]
    assert len(service.seen()) == 3
    assert counters.read(("ok", "over_limit", "error")) == {"ok": 1, "over_limit": 2, "error": 0}


def test_a_service_cluster_named_as_istio_names_clusters(dataplane, app, started_services):
    service = rls(started_services, limit=1)
    port, _ = serve(dataplane, app, service.port, [generic()], rls_cluster="outbound|8081||ratelimit.mesh.svc.cluster.local")
    assert statuses(burst(port, 2)) == [200, 429]
    assert len(service.seen()) == 2


def test_concurrent_clients_with_quota_pass_exactly_the_limit(dataplane, app, started_services, dataplane_kind):
    """Calls made at once each get a grant; meshctl adds them up, so none of what the service
    counted is lost and no more than the limit passes."""
    service = rls(started_services, limit=20, quota=5)
    # A generous timeout: a call that times out fails open and lets one more through, on a busy
    # machine with Envoy's 20 ms default (this test is about counting, not timing).
    port, _ = serve(dataplane, app, service.port, [generic()], filter_extra={"timeout": "2s"})
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: statuses(burst(port, 10)), range(4)))
    passed = sum(r.count(200) for r in results)
    assert passed == 20, results
    assert sum(r.count(429) for r in results) == 20
    if dataplane_kind == "meshctl":
        assert len(service.seen()) < 40
