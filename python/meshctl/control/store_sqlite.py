"""The default store: one SQLite file, owned by one `meshctl serve` at a time."""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import trio

from meshctl.control.store import (
    ChangeBatch,
    ChangeEvent,
    Delete,
    NotFound,
    Put,
    SidecarStatus,
    StaleVersion,
    Store,
    StoredResource,
    StoreInUse,
    Write,
    WriteResult,
)
from meshctl.resources.errors import ResourceRef

T = TypeVar("T")

# Enough history for any watcher that is merely slow; one that is further behind resyncs.
EVENTS_KEPT = 10_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES ('revision', 0), ('schema', 1);
CREATE TABLE IF NOT EXISTS resources (
    kind TEXT NOT NULL, namespace TEXT NOT NULL, name TEXT NOT NULL,
    version INTEGER NOT NULL, created_version INTEGER NOT NULL,
    body TEXT NOT NULL, not_enforced TEXT NOT NULL DEFAULT '[]',
    PRIMARY KEY (kind, namespace, name)
);
CREATE TABLE IF NOT EXISTS events (
    revision INTEGER NOT NULL, type TEXT NOT NULL,
    kind TEXT NOT NULL, namespace TEXT NOT NULL, name TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_revision ON events (revision);
CREATE TABLE IF NOT EXISTS status (
    kind TEXT NOT NULL, namespace TEXT NOT NULL, name TEXT NOT NULL, sidecar_id TEXT NOT NULL,
    version INTEGER NOT NULL, state TEXT NOT NULL, reason TEXT, updated_at REAL NOT NULL,
    PRIMARY KEY (kind, namespace, name, sidecar_id)
);
-- Records of every space (Store.put_record): identity records and a plane's registrations.
CREATE TABLE IF NOT EXISTS identity_records (
    space TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (space, key)
);
"""


def parse_store_url(url: str) -> Path:
    """sqlite:///abs/path.db -> /abs/path.db; sqlite://rel.db -> rel.db (like file:// URLs)."""
    if url.startswith("sqlite://"):
        path = url.removeprefix("sqlite://")
        if path:
            return Path(path)
    if url.startswith("etcd://"):
        raise ValueError("the etcd store is not built yet; use sqlite:///PATH")
    raise ValueError(f"unsupported store {url!r}; use sqlite:///PATH")


class SqliteStore(Store):
    """All SQL runs on a worker thread, one statement batch at a time (a limiter of one), so
    the trio loop never blocks on fsync and the single connection is never shared concurrently."""

    def __init__(self, path: Path, connection: sqlite3.Connection, lock_file: int) -> None:
        super().__init__()
        self.path = path
        self._db = connection
        self._lock_file = lock_file
        self._limiter = trio.CapacityLimiter(1)
        self._revision = self._meta("revision")

    @classmethod
    def open(cls, path: Path) -> SqliteStore:
        path = path.expanduser()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # A second control plane on the same file would hand out the same revisions twice.
        lock_file = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_file)
            raise StoreInUse(f"store {path} is in use by another `meshctl serve`") from None
        # Created 0600 before SQLite opens it: resources may name internal hosts and addresses.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        try:
            connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute(
                "PRAGMA synchronous=FULL"
            )  # an acknowledged apply survives power loss
            connection.executescript(_SCHEMA)
        except sqlite3.DatabaseError as error:
            os.close(lock_file)
            raise StoreInUse(f"store {path} cannot be opened: {error}") from None
        return cls(path, connection, lock_file)

    @property
    def revision(self) -> int:
        return self._revision

    async def _run(self, function: Callable[[], T]) -> T:
        return await trio.to_thread.run_sync(function, limiter=self._limiter)

    def _meta(self, key: str) -> int:
        return self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0]

    async def get(self, ref: ResourceRef) -> StoredResource | None:
        def read() -> StoredResource | None:
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM resources WHERE kind = ? AND namespace = ? AND name = ?",
                (ref.kind, ref.namespace, ref.name),
            ).fetchone()
            return _resource(row) if row else None

        return await self._run(read)

    async def list(
        self, kind: str | None = None, namespace: str | None = None
    ) -> list[StoredResource]:
        def read() -> list[StoredResource]:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM resources WHERE (?1 IS NULL OR kind = ?1) "
                "AND (?2 IS NULL OR namespace = ?2) ORDER BY kind, namespace, name",
                (kind, namespace),
            ).fetchall()
            return [_resource(row) for row in rows]

        return await self._run(read)

    async def snapshot(self) -> tuple[int, list[StoredResource]]:
        def read() -> tuple[int, list[StoredResource]]:
            # One read transaction: the revision and the rows belong together.
            self._db.execute("BEGIN")
            try:
                rows = self._db.execute(
                    f"SELECT {_COLUMNS} FROM resources ORDER BY kind, namespace, name"
                ).fetchall()
                return self._meta("revision"), [_resource(row) for row in rows]
            finally:
                self._db.execute("COMMIT")

        return await self._run(read)

    async def write(self, writes: Sequence[Write]) -> tuple[int, list[WriteResult]]:
        revision, results = await self._run(lambda: self._write(writes))
        if revision != self._revision:
            self._revision = revision
            self._notify()
        return revision, results

    def _write(self, writes: Sequence[Write]) -> tuple[int, list[WriteResult]]:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            current = self._meta("revision")
            new = current + 1
            results: list[WriteResult] = []
            events: list[tuple[int, str, str, str, str]] = []
            for write in writes:
                ref = write.ref
                key = (ref.kind, ref.namespace, ref.name)
                row = db.execute(
                    "SELECT version, created_version, body, not_enforced FROM resources "
                    "WHERE kind = ? AND namespace = ? AND name = ?",
                    key,
                ).fetchone()
                version = row[0] if row else None
                if write.expected_version is not None and version != write.expected_version:
                    raise StaleVersion(ref, write.expected_version, version)
                if isinstance(write, Delete):
                    if row is None:
                        raise NotFound(ref)
                    db.execute(
                        "DELETE FROM resources WHERE kind = ? AND namespace = ? AND name = ?", key
                    )
                    db.execute(
                        "DELETE FROM status WHERE kind = ? AND namespace = ? AND name = ?", key
                    )
                    results.append(WriteResult(ref, "deleted", new))
                    events.append((new, "delete", *key))
                    continue
                assert isinstance(write, Put)
                not_enforced = json.dumps(list(write.not_enforced))
                if row and json.loads(row[2]) == write.body and row[3] == not_enforced:
                    # Re-applying the same file is a no-op: no new version, no xDS push.
                    results.append(WriteResult(ref, "unchanged", row[0]))
                    continue
                db.execute(
                    "INSERT OR REPLACE INTO resources VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (*key, new, row[1] if row else new, json.dumps(write.body), not_enforced),
                )
                results.append(WriteResult(ref, "updated" if row else "created", new))
                events.append((new, "put", *key))
            if not events:
                db.execute("ROLLBACK")
                return current, results
            db.execute("UPDATE meta SET value = ? WHERE key = 'revision'", (new,))
            db.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?)", events)
            db.execute("DELETE FROM events WHERE revision <= ?", (new - EVENTS_KEPT,))
            db.execute("COMMIT")
            return new, results
        except BaseException:
            db.execute("ROLLBACK")
            raise

    async def changes_since(self, revision: int) -> ChangeBatch:
        def read() -> ChangeBatch:
            self._db.execute("BEGIN")
            try:
                current = self._meta("revision")
                oldest = self._db.execute("SELECT MIN(revision) FROM events").fetchone()[0]
                if revision > current or (
                    revision < current and (oldest is None or oldest > revision + 1)
                ):
                    return ChangeBatch(current, (), resync=True)
                rows = self._db.execute(
                    "SELECT revision, type, kind, namespace, name FROM events "
                    "WHERE revision > ? ORDER BY revision",
                    (revision,),
                ).fetchall()
            finally:
                self._db.execute("COMMIT")
            events = tuple(ChangeEvent(row[0], row[1], ResourceRef(*row[2:])) for row in rows)
            return ChangeBatch(current, events)

        return await self._run(read)

    async def set_status(
        self,
        ref: ResourceRef,
        sidecar_id: str,
        version: int,
        accepted: bool,
        reason: str | None = None,
    ) -> None:
        row = (ref.kind, ref.namespace, ref.name, sidecar_id, version,
               "accepted" if accepted else "rejected", reason, time.time())  # fmt: skip
        await self._run(
            lambda: self._db.execute(
                "INSERT OR REPLACE INTO status VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row
            )
        )

    async def forget_sidecar(self, sidecar_id: str) -> None:
        await self._run(
            lambda: self._db.execute("DELETE FROM status WHERE sidecar_id = ?", (sidecar_id,))
        )

    async def statuses(self, refs: Sequence[ResourceRef]) -> dict[ResourceRef, list[SidecarStatus]]:
        wanted = set(refs)

        def read() -> dict[ResourceRef, list[SidecarStatus]]:
            found: dict[ResourceRef, list[SidecarStatus]] = {ref: [] for ref in wanted}
            kinds = sorted({ref.kind for ref in wanted})
            # One query per kind, not per resource: `get` lists can hold thousands of resources.
            query = f"SELECT * FROM status WHERE kind IN ({','.join('?' * len(kinds))}) ORDER BY sidecar_id"
            for row in self._db.execute(query, kinds):
                ref = ResourceRef(*row[:3])
                if ref in wanted:
                    found[ref].append(SidecarStatus(row[3], row[5], row[4], row[6], row[7]))
            return found

        return await self._run(read)

    async def put_record(self, space: str, key: str, value: dict[str, Any]) -> None:
        row = (space, key, json.dumps(value))
        await self._run(
            lambda: self._db.execute("INSERT OR REPLACE INTO identity_records VALUES (?, ?, ?)", row)
        )

    async def get_record(self, space: str, key: str) -> dict[str, Any] | None:
        def read() -> dict[str, Any] | None:
            row = self._db.execute(
                "SELECT value FROM identity_records WHERE space = ? AND key = ?", (space, key)
            ).fetchone()
            return json.loads(row[0]) if row else None

        return await self._run(read)

    async def list_records(self, space: str) -> list[dict[str, Any]]:
        def read() -> list[dict[str, Any]]:
            rows = self._db.execute(
                "SELECT value FROM identity_records WHERE space = ? ORDER BY key", (space,)
            ).fetchall()
            return [json.loads(row[0]) for row in rows]

        return await self._run(read)

    async def delete_records(self, space: str, keys: Sequence[str]) -> None:
        rows = [(space, key) for key in keys]
        await self._run(
            lambda: self._db.executemany(
                "DELETE FROM identity_records WHERE space = ? AND key = ?", rows
            )
        )

    async def aclose(self) -> None:
        await self._run(self._db.close)
        os.close(self._lock_file)


_COLUMNS = "kind, namespace, name, version, created_version, body, not_enforced"


def _resource(row: Any) -> StoredResource:
    return StoredResource(
        ResourceRef(row[0], row[1], row[2]),
        json.loads(row[5]),
        row[3],
        row[4],
        tuple(json.loads(row[6])),
    )
