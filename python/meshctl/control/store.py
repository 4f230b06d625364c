"""The resource store interface: versioned resources, atomic batches, change watches, sidecar status.

Backends (SQLite now, etcd later) implement the abstract methods; the watch machinery is shared.
Versions follow etcd's model so an etcd backend maps onto it directly: the store has one
revision counter, every committed change bumps it once, and a resource's version is the
revision that last changed it.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import trio

from meshctl.resources.errors import ResourceRef


@dataclass(frozen=True)
class StoredResource:
    ref: ResourceRef
    body: dict[str, Any]  # apiVersion, kind, metadata, spec: as applied
    version: int  # the revision that last changed it
    created_version: int
    not_enforced: tuple[str, ...] = ()


@dataclass(frozen=True)
class Put:
    """Create or replace. With expected_version, refused unless the resource is still at it."""

    ref: ResourceRef
    body: dict[str, Any]
    expected_version: int | None = None
    not_enforced: tuple[str, ...] = ()


@dataclass(frozen=True)
class Delete:
    ref: ResourceRef
    expected_version: int | None = None


Write = Put | Delete
Action = Literal["created", "updated", "unchanged", "deleted"]


@dataclass(frozen=True)
class WriteResult:
    ref: ResourceRef
    action: Action
    version: int


@dataclass(frozen=True)
class ChangeEvent:
    revision: int
    type: Literal["put", "delete"]
    ref: ResourceRef


@dataclass(frozen=True)
class ChangeBatch:
    """Everything that changed up to `revision`. With `resync`, the events are not complete
    (the watcher fell behind the retained history): rebuild from `snapshot()` instead."""

    revision: int
    events: tuple[ChangeEvent, ...]
    resync: bool = False


@dataclass(frozen=True)
class SidecarStatus:
    """What one sidecar said about the config built from a resource (the ADS ACK or NACK)."""

    sidecar_id: str
    state: Literal["accepted", "rejected"]
    version: int  # the resource version the sidecar was sent
    reason: str | None
    updated_at: float  # seconds since the epoch


class StoreError(Exception):
    pass


class StaleVersion(StoreError):
    def __init__(self, ref: ResourceRef, expected: int, actual: int | None) -> None:
        now = f"it is at version {actual}" if actual is not None else "it no longer exists"
        super().__init__(
            f"{ref}: the update was made against version {expected}, but {now}; "
            "get it again, re-apply your change and retry"
        )
        self.ref, self.expected, self.actual = ref, expected, actual


class NotFound(StoreError):
    def __init__(self, ref: ResourceRef) -> None:
        super().__init__(f"{ref} not found")
        self.ref = ref


class StoreInUse(StoreError):
    pass


class Store(abc.ABC):
    """A resource store. All methods are trio-async; backends keep blocking I/O off the loop."""

    def __init__(self) -> None:
        self._changed = trio.Event()

    @property
    @abc.abstractmethod
    def revision(self) -> int:
        """The revision of the last committed change (0 for an empty store)."""

    @abc.abstractmethod
    async def get(self, ref: ResourceRef) -> StoredResource | None: ...

    @abc.abstractmethod
    async def list(
        self, kind: str | None = None, namespace: str | None = None
    ) -> list[StoredResource]:
        """Resources sorted by kind, namespace, name; None means every kind or namespace."""

    @abc.abstractmethod
    async def snapshot(self) -> tuple[int, list[StoredResource]]:
        """Every resource and the revision they are consistent at (what the xDS compiler reads)."""

    @abc.abstractmethod
    async def write(self, writes: Sequence[Write]) -> tuple[int, list[WriteResult]]:
        """Apply all writes in one transaction, or none (StaleVersion, NotFound).

        Returns the revision after the batch and one result per write. A batch that changes
        nothing (every put unchanged) does not bump the revision and wakes no watcher.
        """

    @abc.abstractmethod
    async def changes_since(self, revision: int) -> ChangeBatch:
        """The changes after `revision`, coalesced; resync when history no longer reaches back."""

    @abc.abstractmethod
    async def set_status(
        self,
        ref: ResourceRef,
        sidecar_id: str,
        version: int,
        accepted: bool,
        reason: str | None = None,
    ) -> None:
        """Record a sidecar's ACK (accepted) or NACK (rejected, with its error detail)."""

    @abc.abstractmethod
    async def forget_sidecar(self, sidecar_id: str) -> None:
        """Drop a sidecar's statuses (it disconnected for good)."""

    @abc.abstractmethod
    async def statuses(
        self, refs: Sequence[ResourceRef]
    ) -> dict[ResourceRef, list[SidecarStatus]]: ...

    @abc.abstractmethod
    async def aclose(self) -> None: ...

    # --- records: join tokens and issued certificates (meshctl/identity), and a single plane's
    # sidecar registrations (registry.restore) -----------------------------------------------------
    # A key space of their own beside the resources: they are not mesh config (a write bumps no
    # revision and recompiles nothing), they are never listed with resources, and `meshctl apply`
    # has no path to them. On etcd they are shared by every plane like the resources.

    @abc.abstractmethod
    async def put_record(self, space: str, key: str, value: dict[str, Any]) -> None: ...

    @abc.abstractmethod
    async def get_record(self, space: str, key: str) -> dict[str, Any] | None: ...

    @abc.abstractmethod
    async def list_records(self, space: str) -> list[dict[str, Any]]:
        """Every record of `space`, sorted by key."""

    @abc.abstractmethod
    async def delete_records(self, space: str, keys: Sequence[str]) -> None: ...

    async def serve(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the backend's own background work until cancelled; the control plane starts it
        before anything uses the store. etcd follows its watch and keeps a lease here; SQLite
        has nothing to run, so it reports ready and returns."""
        task_status.started(None)

    def _notify(self) -> None:
        """Backends call this after every commit that bumped the revision."""
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for_change(self, after: int) -> int:
        """Return the revision once it is past `after` (immediately if it already is)."""
        while self.revision <= after:
            await self._changed.wait()
        return self.revision

    async def watch(self, since: int | None = None) -> AsyncIterator[ChangeBatch]:
        """Change batches after `since` (default: now), forever; one batch per wake-up.

        Changes committed while the consumer is busy are coalesced into its next batch, so a
        slow consumer (the xDS compiler under a burst of applies) recompiles once, not per change.
        """
        seen = self.revision if since is None else since
        while True:
            await self.wait_for_change(seen)
            batch = await self.changes_since(seen)
            seen = batch.revision
            yield batch
