"""The etcd store on a real 3-member cluster: SQLite's behaviour, two control planes, a member killed."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from helpers.control_plane import start_control_plane
from helpers.etcd_cluster import EtcdCluster, start_cluster

from meshctl.control.etcd_client import Compacted, EtcdClient, EtcdUnavailable, parse_endpoints
from meshctl.control.store import ChangeBatch, Delete, NotFound, Put, StaleVersion, StoreError
from meshctl.control.store_etcd import EtcdStore, open_etcd_store, parse_etcd_url
from meshctl.resources import ResourceRef

pytestmark = pytest.mark.skipif(
    shutil.which("etcd") is None, reason="etcd not installed (scripts/test.sh installs etcd-server)"
)

VS = ResourceRef("VirtualService", "default", "reviews")
DR = ResourceRef("DestinationRule", "default", "reviews")


def body(ref: ResourceRef, spec: dict) -> dict:
    return {"apiVersion": "networking.istio.io/v1", "kind": ref.kind,
            "metadata": {"name": ref.name, "namespace": ref.namespace}, "spec": spec}  # fmt: skip


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    started = start_cluster(tmp_path_factory.mktemp("etcd"))
    yield started
    started.stop()


@pytest.fixture
async def store(cluster: EtcdCluster, request: pytest.FixtureRequest):
    # A key prefix per test: one cluster serves every test without them seeing each other.
    async with open_etcd_store(cluster.url(request.node.name)) as opened:
        yield opened


async def test_versions_are_etcd_revisions_and_unchanged_puts_keep_them(store: EtcdStore) -> None:
    revision, results = await store.write(
        [Put(DR, body(DR, {"host": "reviews"})), Put(VS, body(VS, {"a": 1}))]
    )
    assert [r.action for r in results] == ["created", "created"]
    assert {r.version for r in results} == {revision} and store.revision == revision
    again, results = await store.write([Put(VS, body(VS, {"a": 1}))])
    assert again == revision and results[0].action == "unchanged" and results[0].version == revision
    updated, results = await store.write([Put(VS, body(VS, {"a": 2}), expected_version=revision)])
    assert updated > revision and results[0].action == "updated"
    stored = await store.get(VS)
    assert (stored.version, stored.created_version, stored.body["spec"]) == (
        updated,
        revision,
        {"a": 2},
    )
    assert (await store.get(DR)).version == revision
    assert [item.ref for item in await store.list()] == [DR, VS]
    assert [item.ref for item in await store.list("VirtualService", "default")] == [VS]
    assert await store.list(namespace="other") == []
    at, items = await store.snapshot()
    assert at >= updated and [item.version for item in items] == [revision, updated]


async def test_stale_version_refuses_the_whole_batch(store: EtcdStore) -> None:
    first, _ = await store.write([Put(VS, body(VS, {"a": 1}))])
    second, _ = await store.write([Put(VS, body(VS, {"a": 2}))])
    with pytest.raises(
        StaleVersion, match=f"against version {first}, but it is at version {second}"
    ):
        await store.write(
            [Put(DR, body(DR, {})), Put(VS, body(VS, {"a": 3}), expected_version=first)]
        )
    assert await store.get(DR) is None and (await store.get(VS)).body["spec"] == {"a": 2}
    assert store.revision == second
    with pytest.raises(StaleVersion, match="no longer exists"):
        await store.write([Put(DR, body(DR, {}), expected_version=first)])
    with pytest.raises(NotFound):
        await store.write([Delete(DR)])
    _, results = await store.write([Delete(VS, expected_version=second)])
    assert results[0].action == "deleted" and await store.get(VS) is None


async def test_watch_coalesces_changes_into_batches(store: EtcdStore) -> None:
    start = store.revision
    batches: list[ChangeBatch] = []

    async def consume(task_status=trio.TASK_STATUS_IGNORED) -> None:
        iterator = store.watch(since=start)
        task_status.started()
        async for batch in iterator:
            batches.append(batch)
            if any(event.type == "delete" for event in batch.events):
                return

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(consume)
            first, _ = await store.write([Put(VS, body(VS, {"a": 1})), Put(DR, body(DR, {}))])
            await store.write([Put(VS, body(VS, {"a": 1}))])  # unchanged: no event, no wake-up
            second, _ = await store.write([Put(VS, body(VS, {"a": 2}))])
            third, _ = await store.write([Delete(VS)])
    events = [(e.revision, e.type, e.ref.kind) for batch in batches for e in batch.events]
    assert sorted(events) == sorted([(first, "put", "VirtualService"), (first, "put", "DestinationRule"),
                                     (second, "put", "VirtualService"), (third, "delete", "VirtualService")])  # fmt: skip
    assert batches[-1].revision == third and not any(batch.resync for batch in batches)
    # From before anything this store saw, or beyond what it has seen: rebuild, don't guess.
    assert (await store.changes_since(0)).resync and (await store.changes_since(third + 99)).resync


async def test_sidecar_status_is_kept_per_resource_and_dropped_with_it(store: EtcdStore) -> None:
    version, _ = await store.write([Put(VS, body(VS, {}))])
    await store.set_status(VS, "sidecar-a", version, accepted=True)
    await store.set_status(
        VS, "sidecar-b", version, accepted=False, reason="route reviews: unknown cluster"
    )
    statuses = (await store.statuses([VS]))[VS]
    assert [(s.sidecar_id, s.state, s.version, s.reason) for s in statuses] == [
        ("sidecar-a", "accepted", version, None),
        ("sidecar-b", "rejected", version, "route reviews: unknown cluster")]  # fmt: skip
    await store.forget_sidecar("sidecar-a")
    assert [s.sidecar_id for s in (await store.statuses([VS]))[VS]] == ["sidecar-b"]
    await store.write([Delete(VS)])
    assert (await store.statuses([VS]))[VS] == []


async def test_two_control_planes_share_changes_versions_and_statuses(cluster: EtcdCluster) -> None:
    url = cluster.url("two-planes")
    async with open_etcd_store(url) as plane_a, open_etcd_store(url, status_ttl=2) as plane_b:
        watched = plane_b.watch(since=plane_b.revision)  # a generator starts on first use
        with trio.fail_after(10):
            revision, _ = await plane_a.write([Put(VS, body(VS, {"a": 1}))])
            batch = await anext(watched)
            assert [(e.revision, e.type, e.ref) for e in batch.events] == [(revision, "put", VS)]
            # A stale update is refused whichever plane made the newer change.
            newer, _ = await plane_b.write([Put(VS, body(VS, {"a": 2}), expected_version=revision)])
            with pytest.raises(StaleVersion, match=f"it is at version {newer}"):
                await plane_a.write([Put(VS, body(VS, {"a": 3}), expected_version=revision)])
            assert (await plane_a.get(VS)).body["spec"] == {"a": 2}
            await plane_a.set_status(VS, "sidecar-a", newer, accepted=True)
            await plane_b.set_status(VS, "sidecar-b", newer, accepted=True)
            assert [s.sidecar_id for s in (await plane_a.statuses([VS]))[VS]] == [
                "sidecar-a",
                "sidecar-b",
            ]
    # Plane B is gone without revoking anything: its sidecars' statuses expire with its lease.
    async with open_etcd_store(url) as observer:
        with trio.fail_after(8):
            while [s.sidecar_id for s in (await observer.statuses([VS]))[VS]] != ["sidecar-a"]:
                await trio.sleep(0.2)


async def test_compaction_makes_watchers_resync(cluster: EtcdCluster) -> None:
    url = cluster.url("compaction")
    async with open_etcd_store(url) as store:
        seen = store.revision
        with trio.fail_after(10):
            await store.write([Put(VS, body(VS, {"a": 1}))])
            # What a plane sees after being cut off past etcd's history: resume is impossible.
            store._log.clear()
            await store._reload()
            batch = await store.changes_since(seen)
            assert batch.resync and batch.revision >= seen
    client = EtcdClient(parse_endpoints(cluster.endpoints))
    revision = cluster.put("/compaction-probe", "x")
    cluster.put("/compaction-probe", "y")
    cluster.compact(revision + 1)
    with pytest.raises(Compacted), trio.fail_after(5):
        await client.watch(b"/compaction-probe", b"/compaction-probf", revision, _ignore)
    await client.aclose()


async def _ignore(_revision: int, _events: list) -> None:
    pass


async def test_unreachable_etcd_names_every_endpoint() -> None:
    client = EtcdClient(
        parse_endpoints("127.0.0.1:1,127.0.0.1:2"), attempt_timeout=0.5, deadline=1.0
    )
    with pytest.raises(EtcdUnavailable, match=r"127\.0\.0\.1:1: cannot connect.*127\.0\.0\.1:2"):
        await client.range(b"x")
    assert isinstance(EtcdUnavailable("x"), StoreError)
    assert parse_etcd_url("etcd://a:1,b:2") == ("a:1,b:2", "/meshctl")
    assert parse_etcd_url("etcd://a:1/mesh/prod/") == ("a:1", "/mesh/prod")
    with pytest.raises(ValueError, match="not HOST:PORT"):
        parse_etcd_url("etcd://a:b")


async def test_a_killed_leader_does_not_stop_writes_or_watches(tmp_path: Path) -> None:
    cluster = start_cluster(tmp_path / "etcd")
    try:
        # Both planes prefer the leader, so its death forces each to fail over (writes and
        # watch) while the other two elect a new one.
        leader = cluster.leader()
        url = cluster.url("failover", order=[leader, *(i for i in range(3) if i != leader)])
        async with open_etcd_store(url) as plane_a, open_etcd_store(url) as plane_b:
            written: list[int] = []
            seen_by_b: list[int] = []

            async def write_steadily() -> None:
                for n in range(40):  # every one must succeed: a failed write fails the test
                    revision, _ = await plane_a.write([Put(VS, body(VS, {"n": n}))])
                    written.append(revision)
                    await trio.sleep(0.02)

            async def follow_b(task_status=trio.TASK_STATUS_IGNORED) -> None:
                watched = plane_b.watch(plane_b.revision)
                task_status.started()
                async for batch in watched:
                    assert not batch.resync  # resumed from its last revision: nothing lost
                    seen_by_b.extend(event.revision for event in batch.events)
                    if len(seen_by_b) == 40:
                        return

            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    await nursery.start(follow_b)
                    nursery.start_soon(write_steadily)
                    while len(written) < 10:
                        await trio.sleep(0.01)
                    cluster.members[leader].kill()
            assert seen_by_b == written and len(written) == 40
            # And the other way: plane A's own watch moved off the dead member too.
            watch_a = plane_a.watch(plane_a.revision)
            with trio.fail_after(10):
                from_b, _ = await plane_b.write([Put(DR, body(DR, {}))])
                batch = await anext(watch_a)
                assert [(e.revision, e.ref) for e in batch.events] == [(from_b, DR)]
    finally:
        cluster.stop()


def test_two_meshctl_serve_share_one_cluster(cluster: EtcdCluster, tmp_path: Path) -> None:
    url = cluster.url("e2e")
    first = start_control_plane(tmp_path / "a", "--store", url)
    try:
        second = start_control_plane(tmp_path / "b", "--store", cluster.url("e2e", order=[2, 1, 0]))
        try:
            manifest = json.dumps(body(DR, {"host": "reviews", "subsets": [
                {"name": "v1", "labels": {"version": "v1"}}]}))  # fmt: skip
            applied = first.meshctl("apply", "-f", "-", stdin=manifest)
            assert applied.returncode == 0, applied.stderr
            got = second.meshctl("get", "DestinationRule", "reviews", "-o", "json")
            assert got.returncode == 0, got.stderr + second.log()
            assert json.loads(got.stdout)["spec"]["subsets"][0]["name"] == "v1"
        finally:
            second.stop()
    finally:
        first.stop()


async def test_two_planes_share_sidecar_registrations(cluster: EtcdCluster) -> None:
    """Registered through one plane's registry, known to the other's; renewals keep it there, a
    clean exit removes it everywhere, and an expired one is dropped by each plane and from etcd."""
    from meshctl.control.registry import Registry, parse_registration

    url = cluster.url("shared-registry")
    async with open_etcd_store(url) as store_a, open_etcd_store(url) as store_b:
        planes = {"a": Registry(), "b": Registry()}
        async with trio.open_nursery() as nursery:
            for registry, store in zip(planes.values(), (store_a, store_b), strict=True):
                await nursery.start(registry.share, store)
                nursery.start_soon(registry.serve, 0.1)
            v1 = parse_registration("reviews-v1", json.dumps(
                {"service": "reviews", "version": "v1", "appPort": 9081, "ready": True,
                 "leaseSeconds": 1}).encode())  # fmt: skip
            assert await planes["a"].put(v1)
            with trio.fail_after(5):
                while planes["b"].get("reviews-v1") != v1:
                    await planes["b"].wait_for_change(planes["b"].generation)
            # Renewed through plane b now (its agent failed over): still one registration.
            for _ in range(4):
                await planes["b"].put(v1)
                await trio.sleep(0.4)
            assert [s.node_id for s in planes["a"].sidecars()] == ["reviews-v1"]
            assert await planes["a"].remove("reviews-v1")
            with trio.fail_after(5):
                while planes["b"].get("reviews-v1") is not None:
                    await planes["b"].wait_for_change(planes["b"].generation)
            # No renewal: gone from both planes within 2x the lease, and from etcd.
            await planes["b"].put(v1)
            with trio.fail_after(5):
                while planes["a"].get("reviews-v1") is None:
                    await trio.sleep(0.05)
            with trio.fail_after(2.0 + 0.3):
                while planes["a"].get("reviews-v1") or planes["b"].get("reviews-v1"):
                    await trio.sleep(0.05)
            with trio.fail_after(3):  # a plane's sweep clears the expired key out of etcd
                while (await store_a._client.range(store_a._registrations, prefix_end_of(store_a)))[1]:
                    await trio.sleep(0.1)
            nursery.cancel_scope.cancel()


def prefix_end_of(store: EtcdStore) -> bytes:
    from meshctl.control.etcd_client import prefix_end

    return prefix_end(store._registrations)
