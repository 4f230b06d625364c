"""The store (versions, atomic batches, watches, sidecar status) and the REST API's HTTP edges."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from meshctl.control.api import Limits, serve_api
from meshctl.control.store import ChangeBatch, Delete, NotFound, Put, StaleVersion
from meshctl.control.store_sqlite import SqliteStore, StoreInUse, parse_store_url
from meshctl.resources import ResourceRef

VS = ResourceRef("VirtualService", "default", "reviews")
DR = ResourceRef("DestinationRule", "default", "reviews")


def body(ref: ResourceRef, spec: dict) -> dict:
    return {"apiVersion": "networking.istio.io/v1", "kind": ref.kind,
            "metadata": {"name": ref.name, "namespace": ref.namespace}, "spec": spec}  # fmt: skip


@pytest.fixture
async def store(tmp_path: Path):
    opened = SqliteStore.open(tmp_path / "store.db")
    yield opened
    await opened.aclose()


async def test_versions_are_monotonic_and_unchanged_puts_keep_them(store: SqliteStore) -> None:
    revision, results = await store.write(
        [Put(DR, body(DR, {"host": "reviews"})), Put(VS, body(VS, {"a": 1}))]
    )
    assert revision == 1 and [r.action for r in results] == ["created", "created"]
    revision, results = await store.write([Put(VS, body(VS, {"a": 1}))])
    assert revision == 1 and results[0].action == "unchanged" and results[0].version == 1
    revision, results = await store.write([Put(VS, body(VS, {"a": 2}))])
    assert revision == 2 and results[0].action == "updated"
    stored = await store.get(VS)
    assert stored.version == 2 and stored.created_version == 1 and stored.body["spec"] == {"a": 2}
    assert (await store.get(DR)).version == 1


async def test_stale_version_refuses_the_whole_batch(store: SqliteStore) -> None:
    await store.write([Put(VS, body(VS, {"a": 1}))])
    await store.write([Put(VS, body(VS, {"a": 2}))])  # now at version 2
    with pytest.raises(StaleVersion, match="against version 1, but it is at version 2"):
        await store.write([Put(DR, body(DR, {})), Put(VS, body(VS, {"a": 3}), expected_version=1)])
    assert await store.get(DR) is None and (await store.get(VS)).body["spec"] == {"a": 2}
    assert store.revision == 2
    with pytest.raises(StaleVersion, match="no longer exists"):
        await store.write([Put(DR, body(DR, {}), expected_version=1)])
    with pytest.raises(NotFound):
        await store.write([Delete(DR)])
    _, results = await store.write([Delete(VS, expected_version=2)])
    assert results[0].action == "deleted" and await store.get(VS) is None


async def test_watch_coalesces_changes_into_batches(store: SqliteStore) -> None:
    batches: list[ChangeBatch] = []

    async def consume(task_status=trio.TASK_STATUS_IGNORED) -> None:
        iterator = store.watch(since=0)
        task_status.started()
        async for batch in iterator:
            batches.append(batch)
            if batch.revision >= 3:
                return

    async with trio.open_nursery() as nursery:
        await nursery.start(consume)
        await store.write([Put(VS, body(VS, {"a": 1})), Put(DR, body(DR, {}))])
        await store.write([Put(VS, body(VS, {"a": 1}))])  # unchanged: no event, no wake-up
        await store.write([Put(VS, body(VS, {"a": 2}))])
        await store.write([Delete(VS)])
    events = [
        (event.revision, event.type, event.ref.kind) for batch in batches for event in batch.events
    ]
    assert events == [(1, "put", "VirtualService"), (1, "put", "DestinationRule"), (2, "put", "VirtualService"),
                      (3, "delete", "VirtualService")]  # fmt: skip
    assert batches[-1].revision == 3 and not any(batch.resync for batch in batches)
    # A watcher from a revision the store never had resyncs instead of guessing.
    assert (await store.changes_since(99)).resync


async def test_sidecar_status_is_kept_per_resource_and_dropped_with_it(store: SqliteStore) -> None:
    await store.write([Put(VS, body(VS, {}))])
    await store.set_status(VS, "sidecar-a", 1, accepted=True)
    await store.set_status(
        VS, "sidecar-b", 1, accepted=False, reason="route reviews: unknown cluster"
    )
    statuses = (await store.statuses([VS]))[VS]
    assert [(s.sidecar_id, s.state, s.reason) for s in statuses] == [
        ("sidecar-a", "accepted", None), ("sidecar-b", "rejected", "route reviews: unknown cluster")]  # fmt: skip
    await store.forget_sidecar("sidecar-a")
    assert [s.sidecar_id for s in (await store.statuses([VS]))[VS]] == ["sidecar-b"]
    await store.write([Delete(VS)])
    assert (await store.statuses([VS]))[VS] == []


async def test_store_survives_reopen_and_is_exclusive(tmp_path: Path) -> None:
    store = SqliteStore.open(tmp_path / "s.db")
    await store.write([Put(VS, body(VS, {"a": 1}))])
    with pytest.raises(StoreInUse):
        SqliteStore.open(tmp_path / "s.db")
    await store.aclose()
    reopened = SqliteStore.open(tmp_path / "s.db")
    assert reopened.revision == 1 and (await reopened.get(VS)).body["spec"] == {"a": 1}
    await reopened.aclose()


def test_store_urls() -> None:
    assert parse_store_url("sqlite:///var/lib/mesh.db") == Path("/var/lib/mesh.db")
    assert parse_store_url("sqlite://rel.db") == Path("rel.db")
    with pytest.raises(ValueError, match="etcd store is not built yet"):
        parse_store_url("etcd://a:2379")


async def _exchange(port: int, raw: bytes) -> tuple[int, dict]:
    """Send raw bytes, read until the server closes or one full JSON response arrives."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(raw)
        data = b""
        with trio.fail_after(5):
            while b"\r\n\r\n" not in data or not data.endswith(b"\n"):
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(payload)


async def test_http_edges_auth_limits_and_malformed_requests(store: SqliteStore) -> None:
    limits = Limits(max_body=2048, max_header=1024)
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(serve_api, store, "secret", "127.0.0.1", 0, limits)
        auth = b"Authorization: Bearer secret\r\n"
        status, answer = await _exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 200 and answer == {"status": "ok"}
        status, answer = await _exchange(port, b"GET /v1/resources/vs HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 401 and answer["error"]["exit_code"] == 1
        status, answer = await _exchange(
            port, b"GET /v1/resources/vs HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n"
        )
        assert status == 200 and answer == {"revision": 0, "items": []}
        big = (
            b"POST /v1/apply HTTP/1.1\r\nHost: x\r\n"
            + auth
            + b"Content-Length: 4096\r\n\r\n"
            + b"a" * 4096
        )
        status, answer = await _exchange(port, big)
        assert status == 413 and answer["error"]["code"] == "too_large"
        status, answer = await _exchange(
            port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n"
        )
        assert status == 413
        status, answer = await _exchange(port, b"NONSENSE\r\n\r\n")
        assert status == 400
        status, answer = await _exchange(
            port, b"GET /v1/resources/gateways HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n"
        )
        assert status == 400 and "unknown kind 'gateways'" in answer["error"]["message"]
        status, answer = await _exchange(
            port, b"PUT /v1/apply HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: 0\r\n\r\n"
        )
        assert status == 405
        nursery.cancel_scope.cancel()
    assert store.revision == 0


def test_operator_commands_use_the_first_of_several_control_planes():
    from meshctl.control.client import resolve_address

    assert resolve_address("10.0.0.1:15080, 10.0.0.2:15080") == ("10.0.0.1", 15080)
    assert resolve_address("[::1]:9000,[::1]:9001") == ("::1", 9000)
