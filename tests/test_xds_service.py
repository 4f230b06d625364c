"""The control plane's xDS publishing: snapshots per sidecar from store + registry, recompiling on
change, ACK/NACK verdicts recorded against resources, and the first push after a restart."""

from __future__ import annotations

import trio
from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment

from meshctl.control import resource_types as types
from meshctl.control.registry import Registry, Sidecar
from meshctl.control.snapshot import SnapshotCache
from meshctl.control.store import Put
from meshctl.control.store_sqlite import SqliteStore
from meshctl.control.xds_service import (
    Publisher,
    follow_and_publish,
    node_verdict,
    report_statuses,
)
from meshctl.resources import ResourceRef

RULE = {
    "apiVersion": "networking.istio.io/v1",
    "kind": "DestinationRule",
    "metadata": {"name": "reviews", "namespace": "default"},
    "spec": {"host": "reviews", "subsets": [{"name": "v1", "labels": {"version": "v1"}}]},
}
RULE_REF = ResourceRef("DestinationRule", "default", "reviews")


def reviews(node: str, port: int) -> Sidecar:
    return Sidecar(node_id=node, service="reviews", version="v1", service_port=9080, app_port=port, inbound_port=port + 1, ready=True)


def names(cache: SnapshotCache, node: str, type_url: str) -> list[str]:
    return sorted(cache.snapshot_for(node).of_type(type_url).items)


def test_each_sidecar_gets_its_own_listeners_and_gone_ones_are_cleared():
    cache = SnapshotCache()
    publisher = Publisher(cache)
    client = Sidecar(node_id="client", service="productpage", outbound_port=16001)
    publisher.publish(1, [RULE], 0, [client, reviews("r1", 8001)])
    assert names(cache, "client", types.LISTENER) == ["virtualOutbound"]
    assert names(cache, "r1", types.LISTENER) == ["virtualInbound", "virtualOutbound"]
    assert "inbound|8001||" in names(cache, "r1", types.CLUSTER)
    assert "inbound|8001||" not in names(cache, "client", types.CLUSTER)
    assert cache.snapshot_for("client").of_type(types.ROUTE).version == "1.0"
    routes_before = cache.snapshot_for("client").of_type(types.ROUTE)

    # A second instance changes endpoints only: the client's routes keep their version.
    publisher.publish(1, [RULE], 1, [client, reviews("r1", 8001), reviews("r2", 8002)])
    assert cache.snapshot_for("client").of_type(types.ROUTE) is routes_before
    assert cache.snapshot_for("client").of_type(types.ENDPOINT).version == "1.1"

    publisher.publish(1, [RULE], 2, [client])
    assert cache.snapshot_for("r1") is None  # no snapshot: it keeps serving its last config


def test_a_nack_on_any_type_rejects_that_version_else_the_newest_ack_counts():
    assert node_verdict({}) is None
    acked = {types.CLUSTER: {"acked_version": "3.1", "nacked_version": None, "error": None},
             types.ROUTE: {"acked_version": "10.0", "nacked_version": None, "error": None}}  # fmt: skip
    assert node_verdict(acked) == ("10.0", True, None)
    acked[types.ROUTE] = {"acked_version": "3.1", "nacked_version": "11.0", "error": "weights sum to 0"}
    assert node_verdict(acked) == ("11.0", False, "RDS: weights sum to 0")


async def test_changes_to_the_store_and_registry_are_published(tmp_path):
    store = SqliteStore.open(tmp_path / "store.db")
    cache = SnapshotCache()
    registry = Registry()
    registry.register(Sidecar(node_id="client", service="productpage"))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(follow_and_publish, store, registry, Publisher(cache))
            with trio.fail_after(2):
                while cache.snapshot_for("client") is None:
                    await trio.sleep(0.01)
            assert names(cache, "client", types.CLUSTER) == []
            registry.register(reviews("r1", 8001))
            with trio.fail_after(2):
                while names(cache, "client", types.CLUSTER) != ["outbound|9080||reviews.default.svc.cluster.local"]:
                    await trio.sleep(0.01)
            await store.write([Put(RULE_REF, RULE)])
            with trio.fail_after(2):
                while "outbound|9080|v1|reviews.default.svc.cluster.local" not in names(cache, "client", types.CLUSTER):
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    finally:
        await store.aclose()


async def test_a_restarted_plane_pushes_the_instances_it_knew_at_once(tmp_path):
    """A plane keeps its registrations in its store: restarted on the same store, its very first
    push has every instance the sidecars had, before any of them renewed."""
    store = SqliteStore.open(tmp_path / "store.db")
    try:
        await store.write([Put(RULE_REF, RULE)])
        before = Registry()
        async with trio.open_nursery() as nursery:
            await nursery.start(before.restore, store)
            for sidecar in (Sidecar(node_id="client", service="productpage"), reviews("r1", 8001), reviews("r2", 8003)):
                await before.put(sidecar)
            nursery.cancel_scope.cancel()

        cache = SnapshotCache()
        after = Registry()  # the restarted plane: nothing has renewed with it yet
        async with trio.open_nursery() as nursery:
            await nursery.start(after.restore, store)
            await nursery.start(follow_and_publish, store, after, Publisher(cache))
            with trio.fail_after(2):
                while cache.snapshot_for("client") is None:
                    await trio.sleep(0.01)
            ports = []
            for packed in cache.snapshot_for("client").of_type(types.ENDPOINT).items.values():
                assignment = ClusterLoadAssignment()
                assert packed.Unpack(assignment)
                ports += [
                    endpoint.endpoint.address.socket_address.port_value
                    for locality in assignment.endpoints
                    for endpoint in locality.lb_endpoints
                ]
            ports.sort()
            assert ports == [8002, 8002, 8004, 8004], ports  # r1 and r2 in the default cluster and subset v1
            nursery.cancel_scope.cancel()
    finally:
        await store.aclose()


async def test_statuses_of_a_restored_sidecar_that_never_returns_are_forgotten(tmp_path, autojump_clock):
    store = SqliteStore.open(tmp_path / "store.db")
    try:
        _, (written,) = await store.write([Put(RULE_REF, RULE)])
        await store.set_status(RULE_REF, "gone", written.version, True)
        await store.put_record("registrations", "gone", reviews("gone", 8001).as_json())
        registry = Registry(clock=trio.current_time)
        cache = SnapshotCache()
        async with trio.open_nursery() as nursery:
            await nursery.start(registry.restore, store)
            assert [s.node_id for s in registry.sidecars()] == ["gone"]
            await nursery.start(registry.serve)
            nursery.start_soon(report_statuses, store, registry, cache, Publisher(cache))
            await trio.sleep(reviews("gone", 8001).lease_seconds + 1.5)  # its lease from the restart, a sweep
            assert registry.sidecars() == []
            assert await store.statuses([RULE_REF]) == {RULE_REF: []}
            assert await store.list_records("registrations") == []
            nursery.cancel_scope.cancel()
    finally:
        await store.aclose()


def test_alike_sidecars_share_packed_resources_and_a_change_repacks_only_what_changed(monkeypatch):
    # Every sidecar has its own ports (so its own listeners and inbound cluster), but clusters,
    # endpoints and routes are packed once per build and shared; a weight change serializes one
    # route table's changed virtual host and leaves every other type's object and version alone.
    from meshctl.control import compiler

    serialized: list[str] = []
    real = compiler.resource_to_bytes

    def counting(type_url, document):
        serialized.append(type_url.rpartition(".")[2])
        return real(type_url, document)

    monkeypatch.setattr(compiler, "resource_to_bytes", counting)
    monkeypatch.setattr(compiler, "_PACKED", {})

    def service(weight: int) -> dict:
        return {
            "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": "reviews", "namespace": "default"},
            "spec": {"hosts": ["reviews"], "http": [{"route": [
                {"destination": {"host": "reviews", "subset": "v1"}, "weight": weight},
                {"destination": {"host": "reviews", "subset": "v2"}, "weight": 100 - weight}]}]},
        }  # fmt: skip

    rule = {**RULE, "spec": {"host": "reviews", "subsets": [
        {"name": v, "labels": {"version": v}} for v in ("v1", "v2")]}}  # fmt: skip
    sidecars = [reviews(f"r{i}", 8000 + 10 * i) for i in range(20)]
    sidecars += [Sidecar(node_id=f"c{i}", service="productpage", outbound_port=16000 + i) for i in range(20)]
    cache = SnapshotCache()
    publisher = Publisher(cache)
    publisher.publish(1, [rule, service(90)], 0, sidecars)

    snapshots = [cache.snapshot_for(sidecar.node_id) for sidecar in sidecars]
    clusters = [s.of_type(types.CLUSTER) for s in snapshots]
    shared_cluster = "outbound|9080|v1|reviews.default.svc.cluster.local"
    assert len({id(c.items[shared_cluster]) for c in clusters}) == 1  # one packed object for all
    assert len({id(s.of_type(types.ENDPOINT)) for s in snapshots}) == 1
    assert len({id(s.of_type(types.ROUTE)) for s in snapshots}) == 1
    # Clients without an inbound port share the whole CDS; instances add their own cluster.
    assert len({id(s.of_type(types.CLUSTER)) for s in snapshots[20:]}) == 1
    assert "inbound|8010||" in clusters[1].items and "inbound|8010||" not in clusters[0].items
    # Each distinct resource was serialized once, not once per sidecar.
    assert serialized.count("Cluster") == 3 + 20  # reviews, v1, v2 + 20 inbound clusters
    assert serialized.count("ClusterLoadAssignment") == 3
    assert serialized.count("VirtualHost") == 1
    # Listeners are each sidecar's own: the instances' 20 inbound ones and their one outbound
    # listener on the default port, and the clients' 20 outbound ones.
    assert serialized.count("Listener") == 20 + 1 + 20
    before = {s.node_id: cache.snapshot_for(s.node_id) for s in sidecars}

    serialized.clear()
    publisher.publish(2, [rule, service(50)], 0, sidecars)
    assert serialized == ["VirtualHost", "RouteConfiguration"]
    for sidecar in sidecars:
        now, then = cache.snapshot_for(sidecar.node_id), before[sidecar.node_id]
        for type_url in (types.CLUSTER, types.ENDPOINT, types.LISTENER):
            assert now.of_type(type_url) is then.of_type(type_url)  # not resent by ADS
        assert now.of_type(types.ROUTE).version == "2.0"
        assert then.of_type(types.ROUTE).version == "1.0"
