"""The service registry: registration parsing, leases and their expiry, change generations, and its
REST endpoints on a real API server (token required)."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import pytest
import trio

from meshctl.control.api_handlers import Api, ApiError, Request
from meshctl.control.registry import (
    RegistrationError,
    Registry,
    Sidecar,
    parse_registration,
    sidecar_from_json,
)
from meshctl.control.registry_api import RegistryApi


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def body(**fields) -> bytes:
    return json.dumps({"service": "reviews", **fields}).encode()


def test_a_registration_parses_with_defaults_and_istio_labels():
    sidecar = parse_registration("reviews-1", body(version="v2", appPort=8080, inboundPort=15006, labels={"track": "canary"}))
    assert sidecar == Sidecar(
        node_id="reviews-1", service="reviews", version="v2", app_port=8080, inbound_port=15006,
        labels={"track": "canary"},
    )  # fmt: skip
    assert sidecar.host == "reviews.default.svc.cluster.local"
    assert sidecar.all_labels == {"app": "reviews", "version": "v2", "track": "canary"}
    assert sidecar.endpoint_port == 15006 and not sidecar.is_endpoint  # not ready yet
    assert parse_registration("c", b'{"service": "web"}').app_port is None


@pytest.mark.parametrize(
    ("node", "payload", "reason"),
    [
        ("bad node!", body(), "node id"),
        ("n", b"[1]", "JSON object"),
        ("n", b"{", "not JSON"),
        ("n", b"{}", "service: required"),
        ("n", body(service="Reviews"), "service: 'Reviews' is not a DNS label"),
        ("n", body(appPort=0), "appPort: 0 is not a port"),
        ("n", body(appPort="80"), "appPort: '80' is not a port"),
        ("n", body(leaseSeconds=0.1), "leaseSeconds"),
        ("n", body(ready="yes"), "ready"),
        ("n", body(labels={"a": 1}), "labels"),
        ("n", body(colour="red"), "colour: unknown field"),
        ("n", body(metricsAddress="127.0.0.1"), "metricsAddress: '127.0.0.1' is not HOST:PORT"),
        ("n", body(metricsAddress="127.0.0.1:0"), "metricsAddress: '127.0.0.1:0' is not HOST:PORT"),
        ("n", body(metricsAddress="::1:15020"), "metricsAddress: '::1:15020' is not HOST:PORT"),
        ("n", body(metricsAddress=15020), "metricsAddress: 15020 is not HOST:PORT"),
    ],
)
def test_bad_registrations_name_the_field(node, payload, reason):
    with pytest.raises(RegistrationError, match=reason.replace("(", r"\(")):
        parse_registration(node, payload)


def test_the_metrics_address_is_optional_and_kept_through_the_store_form():
    assert parse_registration("old-agent", body(adminPort=15000)).metrics_address is None
    for address in ("127.0.0.1:15020", "[::1]:15020", "reviews-v1.shop.svc:15020"):
        sidecar = parse_registration("n", body(metricsAddress=address))
        assert sidecar.metrics_address == address
        assert sidecar.as_json()["metricsAddress"] == address
        assert sidecar_from_json("n", sidecar.as_json()) == sidecar


def test_leases_expire_renewals_extend_them_and_only_real_changes_bump_the_generation():
    clock = Clock()
    registry = Registry(clock)
    one = Sidecar(node_id="a", service="reviews", lease_seconds=2)
    assert registry.register(one) and registry.generation == 1
    clock.now += 1.5
    assert not registry.register(one)  # a renewal: same content, new deadline
    assert registry.generation == 1
    clock.now += 1.5
    assert registry.expire() == [] and registry.get("a") == one
    assert registry.set_ready("a", True) and registry.generation == 2
    assert registry.get("a").ready
    clock.now += 0.6
    assert registry.expire() == ["a"] and registry.generation == 3
    assert registry.sidecars() == [] and not registry.set_ready("a", True)
    registry.register(one)
    assert registry.deregister("a") and not registry.deregister("a")


async def test_serve_expires_within_lease_plus_one_sweep_and_wakes_waiters():
    registry = Registry()
    async with trio.open_nursery() as nursery:
        await nursery.start(registry.serve, 0.1)
        registry.register(Sidecar(node_id="a", service="reviews", lease_seconds=0.5))
        generation = registry.generation
        with trio.fail_after(0.5 + 0.1 + 0.3):
            assert await registry.wait_for_change(generation) == generation + 1
        assert registry.sidecars() == []
        nursery.cancel_scope.cancel()


async def test_the_rest_endpoints_register_list_and_deregister():
    registry = Registry()
    registry.xds_address = "127.0.0.1:15012"
    api = Api(store=None, extensions=[RegistryApi(registry)])  # the registry never touches the store
    status, answer = await api.handle(Request("PUT", "/v1/sidecars/reviews-1", body=body(version="v1", appPort=9001)))
    assert status == 200 and answer["changed"] and answer["xds"] == "127.0.0.1:15012"
    assert answer["sidecar"]["appPort"] == 9001
    status, answer = await api.handle(Request("PUT", "/v1/sidecars/reviews-1", body=body(version="v1", appPort=9001)))
    assert not answer["changed"]
    status, listing = await api.handle(Request("GET", "/v1/sidecars"))
    assert [item["nodeId"] for item in listing["items"]] == ["reviews-1"]
    with pytest.raises(ApiError) as refused:
        await api.handle(Request("PUT", "/v1/sidecars/reviews-2", body=body(appPort=70000)))
    assert refused.value.status == 422 and "appPort" in refused.value.message
    with pytest.raises(ApiError) as wrong_method:
        await api.handle(Request("POST", "/v1/sidecars/reviews-1"))
    assert wrong_method.value.status == 405
    assert (await api.handle(Request("DELETE", "/v1/sidecars/reviews-1")))[0] == 200
    with pytest.raises(ApiError) as missing:
        await api.handle(Request("DELETE", "/v1/sidecars/reviews-1"))
    assert missing.value.status == 404


def test_the_registry_endpoints_need_the_token(tmp_path):
    import urllib.error
    import urllib.request

    from helpers.control_plane import start_control_plane

    plane = start_control_plane(tmp_path, "--xds-port", "0")
    try:
        url = f"http://{plane.address}/v1/sidecars/x"
        request = urllib.request.Request(url, data=body(), method="PUT")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=5)
        assert refused.value.code == 401
        request.add_header("Authorization", f"Bearer {plane.token_path.read_text().strip()}")
        with urllib.request.urlopen(request, timeout=5) as response:
            answer = json.loads(response.read())
        assert answer["sidecar"]["service"] == "reviews"
        assert answer["xds"].startswith("127.0.0.1:")
    finally:
        plane.stop()


def test_the_app_gets_the_outbound_listener_as_its_http_proxy():
    from meshctl.agent.mesh_agent import AgentOptions, app_environment

    options = AgentOptions(service="web", control_plane=("127.0.0.1", 1), token="t", outbound_port=16001)
    env = app_environment(options, {"PATH": "/bin"})
    assert env["HTTP_PROXY"] == env["http_proxy"] == "http://127.0.0.1:16001"
    assert "127.0.0.1" in env["NO_PROXY"] and env["PATH"] == "/bin"
    assert app_environment(options, {"no_proxy": "internal"}).get("NO_PROXY") is None  # theirs stays
    assert options.with_node_id().node_id.startswith("web.default-")
    assert options.with_node_id().node_id != options.with_node_id().node_id


class RecordingStore:
    """The record half of a Store, in memory, counting writes."""

    def __init__(self) -> None:
        self.records: dict[str, dict] = {}
        self.writes = 0

    async def put_record(self, space, key, value):
        assert space == "registrations"
        self.records[key] = value
        self.writes += 1

    async def list_records(self, space):
        return [self.records[key] for key in sorted(self.records)]

    async def delete_records(self, space, keys):
        for key in keys:
            self.records.pop(key, None)
        self.writes += 1


async def test_a_plane_keeps_changes_not_renewals_and_restores_them_with_a_lease_from_now():
    clock, store = Clock(), RecordingStore()
    registry = Registry(clock)
    await registry.restore(store)
    sidecar = Sidecar(node_id="a", service="reviews", app_port=8080, lease_seconds=3, identity="spiffe://cluster.local/ns/default/sa/reviews")
    await registry.put(sidecar)
    await registry.put(sidecar)  # a plain renewal: nothing to keep
    assert store.writes == 1
    await registry.put(replace(sidecar, ready=True))
    assert store.writes == 2 and store.records["a"]["ready"] is True

    # Restarted long after the lease ran out: the plane could not hear renewals, so it gives one.
    clock.now += 60
    restarted = Registry(clock)
    await restarted.restore(store)
    assert restarted.sidecars() == [replace(sidecar, ready=True)]  # identity kept too
    clock.now += 2.9
    assert restarted.expire() == []
    clock.now += 0.2
    assert restarted.expire() == ["a"]

    await registry.remove("a")
    assert store.records == {}


def test_a_plane_starting_on_etcd_gives_expired_entries_a_lease_and_later_ones_none():
    clock = Clock()
    registry = Registry(clock)
    entry = {"sidecar": Sidecar(node_id="a", service="reviews", lease_seconds=3).as_json(), "expiresAt": time.time() - 30}
    registry._starting = True  # what share() sets while it loads etcd's entries
    registry._remote_put("a", entry)
    assert [s.node_id for s in registry.sidecars()] == ["a"]
    clock.now += 3.1
    assert registry.expire() == ["a"]
    registry._starting = False  # once running, an expired entry is one nobody renewed
    registry._remote_put("a", entry)
    assert registry.sidecars() == []
