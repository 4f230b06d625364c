"""The HA store: resources, versions, watches and sidecar status on an etcd v3 cluster shared by control planes.

Keys, under the URL's prefix (default /meshctl), each component percent-quoted:

    <prefix>/resources/<kind>/<namespace>/<name>        {"body": ..., "not_enforced": [...]}
    <prefix>/status/<kind>/<namespace>/<name>/<sidecar>/<plane>   {"version", "state", ...}
    <prefix>/sidecars/<node_id>                         {"sidecar": ..., "expiresAt", "plane"}
    <prefix>/identity/<space>/<key>                     join tokens, issued certificates (JSON)

A resource's version is its key's mod_revision and its created_version the create_revision,
so the store's versions are etcd's revisions and mean the same to every control plane. Every
write is one etcd transaction that compares the mod_revision of each key it read, which is
how a stale update is refused even when another control plane made the newer change.

Sidecar statuses are written under a lease of this control plane's, kept alive while it runs:
when a control plane dies, the statuses of its sidecars expire with it (they reconnect to
another plane, whose ACKs are recorded under its own lease). Keys carry the plane's id so two
planes never overwrite or forget each other's entries; readers keep the newest per sidecar.

Sidecar registrations (the service registry) are shared too, so every plane compiles the
endpoints of every instance whichever plane it registered with: each carries its wall-clock
expiry (a renewal is a put that moves it), and planes drop and delete an entry once that passes.
Unlike statuses they are under no plane's lease: when every plane was down at once, the first
one back restores them (registry.share) instead of forgetting instances that are alive.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections import deque
from collections.abc import Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

import trio

from meshctl.control.etcd_client import (
    Compacted,
    EtcdClient,
    EtcdError,
    KeyValue,
    WatchEvent,
    delete_op,
    key_values,
    mod_revision_is,
    parse_endpoints,
    prefix_end,
    put_op,
    range_op,
)
from meshctl.control.store import (
    Action,
    ChangeBatch,
    ChangeEvent,
    Delete,
    NotFound,
    Put,
    SidecarStatus,
    StaleVersion,
    Store,
    StoredResource,
    StoreError,
    Write,
    WriteResult,
)
from meshctl.resources.errors import ResourceRef

log = logging.getLogger("meshctl.control.store_etcd")

DEFAULT_PREFIX = "/meshctl"
EVENTS_KEPT = 10_000  # as SQLite: enough for a slow watcher; one further behind resyncs
STATUS_TTL = 30  # seconds a dead plane's sidecar statuses outlive it
WRITE_ATTEMPTS = 8  # another plane committing between our read and our txn: read again
# A write returns once this plane's own watch has seen it, so its watchers (the xDS server)
# move first and `revision` reads back what was written; bounded in case the watch is failing over.
WRITE_VISIBLE_TIMEOUT = 5.0
_READS_PER_TXN = 64  # under etcd's default --max-txn-ops (128)
_NEW = -1  # the version of something this batch writes, known once the txn commits


def parse_etcd_url(url: str) -> tuple[str, str]:
    """etcd://HOST:PORT,HOST:PORT[/PREFIX] -> (endpoints text, key prefix)."""
    if not url.startswith("etcd://"):
        raise ValueError(f"not an etcd store URL: {url!r}; use etcd://HOST:PORT,HOST:PORT,...")
    hosts, _, path = url.removeprefix("etcd://").partition("/")
    parse_endpoints(hosts)  # refuse a malformed URL before anything starts
    return hosts, "/" + path.strip("/") if path.strip("/") else DEFAULT_PREFIX


@dataclass
class _Planned:
    """One resource as the batch leaves it."""

    original: KeyValue | None
    exists: bool
    body: dict[str, Any] | None
    not_enforced: tuple[str, ...]
    version: int
    changed: bool = False


class EtcdStore(Store):
    """Run `serve()` (in the control plane's nursery) before use: it loads the revision, follows
    the etcd watch and keeps the status lease alive. `open_etcd_store` does both for tests."""

    def __init__(
        self, client: EtcdClient, prefix: str = DEFAULT_PREFIX, *, status_ttl: int = STATUS_TTL
    ) -> None:
        super().__init__()
        self._client = client
        self.prefix = prefix
        self._resources = f"{prefix}/resources/".encode()
        self._status = f"{prefix}/status/".encode()
        self._registrations = f"{prefix}/sidecars/".encode()
        self._identity = f"{prefix}/identity/".encode()
        self._status_ttl = status_ttl
        self.plane_id = secrets.token_hex(6)  # this process, for its status keys
        self._revision = 0
        self._serving = False
        # Changes this plane's watch delivered; complete for revisions after _log_floor.
        self._log: deque[ChangeEvent] = deque(maxlen=EVENTS_KEPT)
        self._log_floor = 0
        self._lease = 0
        self._lease_lock = trio.Lock()
        # Statuses this plane wrote, re-written if its lease is ever lost (etcd unreachable for
        # longer than the TTL); as large as the statuses themselves: sidecars x resources.
        self._own_statuses: dict[bytes, bytes] = {}

    @classmethod
    def from_url(cls, url: str, **options: Any) -> EtcdStore:
        """No I/O here: `serve()` connects, so a dead cluster is reported at startup, in trio."""
        hosts, prefix = parse_etcd_url(url)
        return cls(EtcdClient(parse_endpoints(hosts)), prefix, **options)

    @property
    def endpoints(self) -> str:
        return ",".join(str(endpoint) for endpoint in self._client.endpoints)

    @property
    def revision(self) -> int:
        """The etcd revision up to which this plane has seen every resource change."""
        return self._revision

    # --- lifecycle -------------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, then follow the cluster until cancelled."""
        await self._reload()
        self._lease = await self._client.lease_grant(self._status_ttl)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._follow)
            nursery.start_soon(self._keep_lease)
            self._serving = True
            try:
                task_status.started(f"etcd store at {self.endpoints} (prefix {self.prefix})")
                await trio.sleep_forever()
            finally:
                self._serving = False

    async def aclose(self) -> None:
        # The lease is left to expire rather than revoked: statuses survive a quick restart.
        await self._client.aclose()

    def _check_serving(self) -> None:
        if not self._serving:
            raise StoreError("the etcd store is not running: start EtcdStore.serve() first")

    # --- the watch -------------------------------------------------------------------------------

    async def _reload(self) -> None:
        """Start (or restart, after compaction) from the cluster's current revision."""
        # Only the revision matters here; one key keeps the answer small however big the mesh.
        revision, _ = await self._client.range(
            self._resources, prefix_end(self._resources), keys_only=True, limit=1
        )
        self._log.clear()
        self._log_floor = revision
        if revision > self._revision:
            self._revision = revision
            self._notify()  # watchers behind the floor get a resync from changes_since

    async def _follow(self) -> None:
        while True:
            try:
                await self._client.watch(
                    self._resources,
                    prefix_end(self._resources),
                    self._log_floor + 1 if not self._log else self._log[-1].revision + 1,
                    self._on_events,
                )
            except Compacted as compacted:
                log.warning("%s: watchers resync from the current state", compacted)
                await self._reload_until_done()

    async def _reload_until_done(self) -> None:
        while True:
            try:
                return await self._reload()
            except EtcdError as error:
                log.warning("cannot reload from etcd, retrying: %s", error)
                await trio.sleep(1)

    async def _on_events(self, _revision: int, events: list[WatchEvent]) -> None:
        newest = 0
        for event in events:
            ref = self._ref(event.kv.key)
            if ref is None:
                log.warning("ignoring a foreign key under %s: %r", self.prefix, event.kv.key)
                continue
            if len(self._log) == self._log.maxlen:
                self._log_floor = self._log[0].revision
            self._log.append(ChangeEvent(event.kv.mod_revision, event.type, ref))
            if event.type == "delete":
                self._drop_own_statuses(self._status_prefix(ref))
            newest = max(newest, event.kv.mod_revision)
        if newest > self._revision:
            self._revision = newest
            self._notify()

    async def changes_since(self, revision: int) -> ChangeBatch:
        if revision < self._log_floor or revision > self._revision:
            return ChangeBatch(self._revision, (), resync=True)
        events: list[ChangeEvent] = []
        for event in reversed(self._log):  # the tail is what a watcher that keeps up needs
            if event.revision <= revision:
                break
            events.append(event)
        return ChangeBatch(self._revision, tuple(reversed(events)))

    # --- reads -----------------------------------------------------------------------------------

    async def get(self, ref: ResourceRef) -> StoredResource | None:
        self._check_serving()
        _, found = await self._client.range(self._key(ref))
        return self._resource(found[0]) if found else None

    async def list(
        self, kind: str | None = None, namespace: str | None = None
    ) -> list[StoredResource]:
        self._check_serving()
        start = self._resources + (f"{quote(kind, safe='')}/".encode() if kind else b"")
        _, found = await self._client.range(start, prefix_end(start))
        items = [item for item in map(self._resource, found) if item is not None]
        items = [item for item in items if namespace is None or item.ref.namespace == namespace]
        return sorted(items, key=lambda item: (item.ref.kind, item.ref.namespace, item.ref.name))

    async def snapshot(self) -> tuple[int, list[StoredResource]]:
        self._check_serving()
        # One range: the revision etcd answers with is the one every item is consistent at.
        revision, found = await self._client.range(self._resources, prefix_end(self._resources))
        items = [item for item in map(self._resource, found) if item is not None]
        return revision, sorted(items, key=lambda i: (i.ref.kind, i.ref.namespace, i.ref.name))

    # --- writes ----------------------------------------------------------------------------------

    async def write(self, writes: Sequence[Write]) -> tuple[int, list[WriteResult]]:
        self._check_serving()
        for _ in range(WRITE_ATTEMPTS):
            current = await self._read({write.ref for write in writes})
            planned, results = _plan(writes, current)
            compares, ops = self._transaction(planned)
            if not ops:
                return self._revision, _resolve(results, self._revision)
            try:
                committed, revision, _ = await self._client.txn(compares, ops)
            except EtcdError as error:
                raise _explain(error, len(ops)) from None
            if committed:
                with trio.move_on_after(WRITE_VISIBLE_TIMEOUT):
                    await self.wait_for_change(revision - 1)
                return revision, _resolve(results, revision)
            # Another plane changed one of these resources after we read it: read again, so a
            # stale expected_version is refused against what is really there now.
        raise StoreError(
            f"{len(writes)} resources kept being changed by other control planes; retry the apply"
        )

    async def _read(self, refs: set[ResourceRef]) -> dict[ResourceRef, KeyValue | None]:
        ordered = sorted(refs, key=lambda ref: (ref.kind, ref.namespace, ref.name))
        current: dict[ResourceRef, KeyValue | None] = {}
        # Several txns when the batch is large: they need not agree on one revision, since the
        # write compares every key's mod_revision and starts over if any moved.
        for start in range(0, len(ordered), _READS_PER_TXN):
            chunk = ordered[start : start + _READS_PER_TXN]
            _, _, responses = await self._client.txn([], [range_op(self._key(r)) for r in chunk])
            for ref, response in zip(chunk, responses, strict=True):
                found = key_values(response.get("response_range", {}))
                current[ref] = found[0] if found else None
        return current

    def _transaction(
        self, planned: dict[ResourceRef, _Planned]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        compares, ops = [], []
        for ref, item in planned.items():
            key = self._key(ref)
            # Every key read is compared, unchanged ones too: "unchanged" must still be true
            # at the revision the rest of the batch commits at.
            compares.append(
                mod_revision_is(key, item.original.mod_revision if item.original else 0)
            )
            if not item.changed:
                continue
            if item.exists:
                value = {"body": item.body, "not_enforced": list(item.not_enforced)}
                ops.append(put_op(key, json.dumps(value, separators=(",", ":")).encode()))
            elif item.original is not None:
                ops.append(delete_op(key))
                status = self._status_prefix(ref)
                ops.append(delete_op(status, prefix_end(status)))
        return compares, ops

    # --- sidecar status --------------------------------------------------------------------------

    async def set_status(
        self,
        ref: ResourceRef,
        sidecar_id: str,
        version: int,
        accepted: bool,
        reason: str | None = None,
    ) -> None:
        self._check_serving()
        key = self._status_prefix(ref) + f"{quote(sidecar_id, safe='')}/{self.plane_id}".encode()
        value = json.dumps(
            {"version": version, "state": "accepted" if accepted else "rejected",
             "reason": reason, "updated_at": time.time()}, separators=(",", ":"),
        ).encode()  # fmt: skip
        self._own_statuses[key] = value
        lease = self._lease
        try:
            await self._client.txn([], [put_op(key, value, lease)])
        except EtcdError as error:
            if not _lease_missing(error):
                raise
            await self._renew_lease(lease)  # rewrites every own status, this one included

    async def forget_sidecar(self, sidecar_id: str) -> None:
        self._check_serving()
        suffix = f"/{quote(sidecar_id, safe='')}/{self.plane_id}".encode()
        keys = [key for key in self._own_statuses if key.endswith(suffix)]
        for key in keys:
            del self._own_statuses[key]
        for start in range(0, len(keys), _READS_PER_TXN):
            await self._client.txn(
                [], [delete_op(key) for key in keys[start : start + _READS_PER_TXN]]
            )

    async def statuses(self, refs: Sequence[ResourceRef]) -> dict[ResourceRef, list[SidecarStatus]]:
        self._check_serving()
        wanted = set(refs)
        newest: dict[tuple[ResourceRef, str], SidecarStatus] = {}
        # One range per kind, not per resource: `get` lists can hold thousands of resources.
        for kind in sorted({ref.kind for ref in wanted}):
            start = self._status + f"{quote(kind, safe='')}/".encode()
            _, found = await self._client.range(start, prefix_end(start))
            for kv in found:
                parsed = self._parse_status(kv)
                if parsed is None or parsed[0] not in wanted:
                    continue
                ref, status = parsed
                seen = newest.get((ref, status.sidecar_id))
                if seen is None or status.updated_at > seen.updated_at:
                    newest[(ref, status.sidecar_id)] = status
        found_by_ref: dict[ResourceRef, list[SidecarStatus]] = {ref: [] for ref in wanted}
        for (ref, _), status in sorted(newest.items(), key=lambda item: item[0][1]):
            found_by_ref[ref].append(status)
        return found_by_ref

    async def _keep_lease(self) -> None:
        while True:
            await trio.sleep(self._status_ttl / 3)
            lease = self._lease
            try:
                if await self._client.lease_keepalive(lease) <= 0:
                    await self._renew_lease(lease)
            except EtcdError as error:
                # Keep trying: while etcd is away nothing can be written anyway.
                log.warning("cannot keep the status lease alive: %s", error)

    async def _renew_lease(self, lost: int) -> None:
        async with self._lease_lock:
            if self._lease != lost:
                return  # another task already replaced it
            self._lease = await self._client.lease_grant(self._status_ttl)
            log.warning("status lease %x expired; re-writing %d statuses under a new one",
                        lost, len(self._own_statuses))  # fmt: skip
            items = list(self._own_statuses.items())
            for start in range(0, len(items), _READS_PER_TXN):
                chunk = items[start : start + _READS_PER_TXN]
                await self._client.txn([], [put_op(k, v, self._lease) for k, v in chunk])

    def _drop_own_statuses(self, prefix: bytes) -> None:
        for key in [key for key in self._own_statuses if key.startswith(prefix)]:
            del self._own_statuses[key]

    # --- shared sidecar registrations ----------------------------------------------------------

    async def put_registration(self, node_id: str, value: dict[str, Any]) -> None:
        """Create or renew a registration (value: {"sidecar", "expiresAt"}) for every plane."""
        self._check_serving()
        key = self._registrations + quote(node_id, safe="").encode()
        raw = json.dumps({**value, "plane": self.plane_id}, separators=(",", ":")).encode()
        # Not under this plane's lease: a registration must outlive every plane being down at
        # once (a restarted plane restores it, registry.share); planes sweep expired ones.
        await self._client.txn([], [put_op(key, raw)])

    async def delete_registration(self, node_id: str, *, only_if_expired: bool = False) -> bool:
        """Remove a registration; with only_if_expired, unless a renewal moved its expiry since."""
        self._check_serving()
        key = self._registrations + quote(node_id, safe="").encode()
        _, found = await self._client.range(key)
        if not found:
            return False
        if only_if_expired:
            value = _registration_value(found[0])
            if value is not None and value.get("expiresAt", 0) > time.time():
                return False
        committed, _, _ = await self._client.txn(
            [mod_revision_is(key, found[0].mod_revision)], [delete_op(key)]
        )
        return committed

    async def follow_registrations(
        self,
        on_put: Any,
        on_delete: Any,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Call on_put(node_id, value) for every registration there is, then follow changes
        (on_put / on_delete(node_id)) until cancelled. Started once the first load is done."""
        start, end = self._registrations, prefix_end(self._registrations)
        started = False
        while True:
            try:
                revision, found = await self._client.range(start, end)
            except EtcdError as error:
                if not started:
                    raise
                log.warning("cannot reload sidecar registrations, retrying: %s", error)
                await trio.sleep(1)
                continue
            for kv in found:
                value = _registration_value(kv)
                if value is not None:
                    on_put(self._registration_node(kv.key), value)
            if not started:
                started = True
                task_status.started()

            async def deliver(_revision: int, events: list[WatchEvent]) -> None:
                for event in events:
                    node_id = self._registration_node(event.kv.key)
                    if event.type == "delete":
                        on_delete(node_id)
                    elif (value := _registration_value(event.kv)) is not None:
                        on_put(node_id, value)

            try:
                await self._client.watch(start, end, revision + 1, deliver)
            except Compacted as compacted:
                log.warning("%s: reloading sidecar registrations", compacted)

    # --- identity records (join tokens, issued certificates) ------------------------------------

    def _record_key(self, space: str, key: str) -> bytes:
        return self._identity + _path(space, key)

    async def put_record(self, space: str, key: str, value: dict[str, Any]) -> None:
        self._check_serving()
        raw = json.dumps(value, separators=(",", ":")).encode()
        await self._client.txn([], [put_op(self._record_key(space, key), raw)])

    async def put_record_if_absent(self, space: str, key: str, value: dict[str, Any]) -> bool:
        """Create a record unless one exists (another plane's wins); True if this one was written."""
        self._check_serving()
        record_key = self._record_key(space, key)
        raw = json.dumps(value, separators=(",", ":")).encode()
        committed, _, _ = await self._client.txn([mod_revision_is(record_key, 0)], [put_op(record_key, raw)])
        return committed

    async def get_record(self, space: str, key: str) -> dict[str, Any] | None:
        self._check_serving()
        _, found = await self._client.range(self._record_key(space, key))
        return _record_value(found[0]) if found else None

    async def list_records(self, space: str) -> list[dict[str, Any]]:
        self._check_serving()
        start = self._identity + _path(space) + b"/"
        _, found = await self._client.range(start, prefix_end(start))
        return [value for value in map(_record_value, found) if value is not None]

    async def delete_records(self, space: str, keys: Sequence[str]) -> None:
        self._check_serving()
        keys = list(keys)
        for start in range(0, len(keys), _READS_PER_TXN):
            chunk = keys[start : start + _READS_PER_TXN]
            await self._client.txn([], [delete_op(self._record_key(space, key)) for key in chunk])

    async def follow_records(
        self,
        space: str,
        on_put: Any,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Call on_put(value) for every record of `space` another plane (or this one) writes,
        from now on, until cancelled: how a revocation made on one plane reaches the others."""
        start = self._identity + _path(space) + b"/"
        end = prefix_end(start)
        started = False
        while True:
            try:
                revision, _ = await self._client.range(start, end, keys_only=True, limit=1)
            except EtcdError as error:
                if not started:
                    raise
                log.warning("cannot follow %s records, retrying: %s", space, error)
                await trio.sleep(1)
                continue
            if not started:
                started = True
                task_status.started()

            async def deliver(_revision: int, events: list[WatchEvent]) -> None:
                for event in events:
                    if event.type == "put" and (value := _record_value(event.kv)) is not None:
                        on_put(value)

            try:
                await self._client.watch(start, end, revision + 1, deliver)
            except Compacted as compacted:
                log.warning("%s: following %s records from now", compacted, space)

    def _registration_node(self, key: bytes) -> str:
        return unquote(key.removeprefix(self._registrations).decode("utf-8", "replace"))

    # --- keys ------------------------------------------------------------------------------------

    def _key(self, ref: ResourceRef) -> bytes:
        return self._resources + _path(ref.kind, ref.namespace, ref.name)

    def _status_prefix(self, ref: ResourceRef) -> bytes:
        return self._status + _path(ref.kind, ref.namespace, ref.name) + b"/"

    def _ref(self, key: bytes) -> ResourceRef | None:
        parts = key.removeprefix(self._resources).decode("utf-8", "replace").split("/")
        return ResourceRef(*map(unquote, parts)) if len(parts) == 3 else None

    def _resource(self, kv: KeyValue) -> StoredResource | None:
        ref = self._ref(kv.key)
        try:
            value = json.loads(kv.value)
        except ValueError:
            value = None
        if ref is None or not isinstance(value, dict) or "body" not in value:
            log.warning("ignoring a malformed resource key in etcd: %r", kv.key)
            return None
        not_enforced = tuple(value.get("not_enforced", ()))
        return StoredResource(ref, value["body"], kv.mod_revision, kv.create_revision, not_enforced)

    def _parse_status(self, kv: KeyValue) -> tuple[ResourceRef, SidecarStatus] | None:
        parts = kv.key.removeprefix(self._status).decode("utf-8", "replace").split("/")
        try:
            value = json.loads(kv.value)
            kind, namespace, name, sidecar, _plane = map(unquote, parts)
            status = SidecarStatus(sidecar, value["state"], int(value["version"]),
                                   value.get("reason"), float(value["updated_at"]))  # fmt: skip
        except (ValueError, KeyError, TypeError):
            return None
        return ResourceRef(kind, namespace, name), status


def _registration_value(kv: KeyValue) -> dict[str, Any] | None:
    try:
        value = json.loads(kv.value)
    except ValueError:
        value = None
    if not isinstance(value, dict) or not isinstance(value.get("sidecar"), dict):
        log.warning("ignoring a malformed sidecar registration in etcd: %r", kv.key)
        return None
    return value


def _record_value(kv: KeyValue) -> dict[str, Any] | None:
    try:
        value = json.loads(kv.value)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        log.warning("ignoring a malformed identity record in etcd: %r", kv.key)
        return None
    return value


def _path(*components: str) -> bytes:
    return "/".join(quote(component, safe="") for component in components).encode()


def _plan(
    writes: Sequence[Write], current: dict[ResourceRef, KeyValue | None]
) -> tuple[dict[ResourceRef, _Planned], list[tuple[ResourceRef, Action, int]]]:
    """Apply the batch in memory, in order (as SQLite does in its transaction)."""
    planned: dict[ResourceRef, _Planned] = {}
    for ref, kv in current.items():
        value = json.loads(kv.value) if kv else {}
        planned[ref] = _Planned(kv, kv is not None, value.get("body"),
                                tuple(value.get("not_enforced", ())),
                                kv.mod_revision if kv else 0)  # fmt: skip
    results: list[tuple[ResourceRef, Action, int]] = []
    for write in writes:
        item = planned[write.ref]
        version = item.version if item.exists else None
        if write.expected_version is not None and version != write.expected_version:
            raise StaleVersion(write.ref, write.expected_version, version)
        if isinstance(write, Delete):
            if not item.exists:
                raise NotFound(write.ref)
            item.exists, item.body, item.changed = False, None, True
            results.append((write.ref, "deleted", _NEW))
            continue
        assert isinstance(write, Put)
        if item.exists and item.body == write.body and item.not_enforced == write.not_enforced:
            # Re-applying the same file is a no-op: no new version, no xDS push.
            results.append((write.ref, "unchanged", item.version))
            continue
        action: Action = "updated" if item.exists else "created"
        item.exists, item.body, item.not_enforced = True, write.body, tuple(write.not_enforced)
        item.version, item.changed = _NEW, True
        results.append((write.ref, action, _NEW))
    return planned, results


def _resolve(results: list[tuple[ResourceRef, Action, int]], revision: int) -> list[WriteResult]:
    return [WriteResult(ref, action, revision if version == _NEW else version)
            for ref, action, version in results]  # fmt: skip


def _lease_missing(error: EtcdError) -> bool:
    return "lease not found" in str(error)


def _explain(error: EtcdError, operations: int) -> StoreError:
    """etcd's limits, in terms of what the operator did."""
    text = str(error)
    if "too many operations" in text:
        return StoreError(
            f"this apply needs {operations} etcd operations in one transaction, more than the "
            "cluster allows (etcd --max-txn-ops, default 128): raise it on every member, or "
            "apply fewer resources at a time"
        )
    if "request is too large" in text:
        return StoreError(
            "this apply is larger than one etcd request may be (etcd --max-request-bytes, "
            "default 1.5 MiB): raise it on every member, or apply fewer resources at a time"
        )
    return error


@asynccontextmanager
async def open_etcd_store(url: str, **options: Any):
    """An EtcdStore serving in its own nursery (for tests and tools that run no control plane)."""
    store = EtcdStore.from_url(url, **options)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.serve)
            try:
                yield store
            finally:
                nursery.cancel_scope.cancel()
    finally:
        await store.aclose()
