"""Snapshots of xDS resources (one version per type) and the cache that hands them to ADS streams."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from envoy.service.discovery.v3.discovery_pb2 import DiscoveryResponse
from google.protobuf.any_pb2 import Any as AnyMessage
from google.protobuf.message import Message

from meshctl.control import resource_types
from meshctl.control.ack_status import AckStatus


@dataclass(frozen=True, eq=False)
class TypeResources:
    """One type's resources at one version: name → packed Any. Compared by identity: a stream
    resends a type only when the object it holds is no longer the cache's current one."""

    type_url: str
    version: str
    items: Mapping[str, AnyMessage]
    # Encoded `resources` fields of a DiscoveryResponse, by the names chosen (None: all).
    _encoded: dict[tuple[str, ...] | None, bytes] = field(default_factory=dict, repr=False, compare=False)

    def encoded_resources(self, names: tuple[str, ...] | None = None) -> bytes:
        """The `resources` field of a DiscoveryResponse carrying these resources (None: all, in
        order), encoded once and shared by every stream that sends them: appended to an encoded
        DiscoveryResponse with the other fields set, it makes the whole response."""
        found = self._encoded.get(names)
        if found is None:
            chosen = self.items.values() if names is None else (self.items[name] for name in names)
            found = DiscoveryResponse(resources=list(chosen)).SerializeToString()
            if len(self._encoded) >= 16:
                self._encoded.clear()  # subscriptions to ever other names: keep it bounded
            self._encoded[names] = found
        return found

    def same_content(self, other: TypeResources) -> bool:
        # Resources shared between snapshots are the same packed objects: identity first, so
        # comparing two versions of a big config does not compare its bytes.
        if self is other:
            return True
        if self.items.keys() != other.items.keys():
            return False
        theirs = other.items
        for name, mine in self.items.items():
            other_item = theirs[name]
            if mine is not other_item and mine.value != other_item.value:
                return False
        return True

    @classmethod
    def of_packed(
        cls, type_url: str, version: str, named: Iterable[tuple[str, AnyMessage]]
    ) -> TypeResources:
        """Resources already packed (name, Any), e.g. shared with other snapshots; ValueError for
        one unnamed, of another type, or named twice."""
        label = resource_types.SHORT_NAMES[type_url]
        items: dict[str, AnyMessage] = {}
        for position, (name, packed) in enumerate(named):
            if not name:
                raise ValueError(f"snapshot {version}: {label} resource [{position}] has no name")
            if packed.type_url != type_url:
                raise ValueError(
                    f'snapshot {version}: {label} resource "{name}" is a {packed.type_url}'
                )
            if name in items:
                raise ValueError(f'snapshot {version}: {label} resource "{name}" appears twice')
            items[name] = packed
        return cls(type_url, version, MappingProxyType(items))

    def extended(self, version: str, named: Iterable[tuple[str, AnyMessage]]) -> TypeResources:
        """These resources plus more (a sidecar's own beside the shared ones), at `version`."""
        more = TypeResources.of_packed(self.type_url, version, named)
        clash = more.items.keys() & self.items.keys()
        if clash:
            label = resource_types.SHORT_NAMES[self.type_url]
            raise ValueError(f'snapshot {version}: {label} resource "{min(clash)}" appears twice')
        return TypeResources(self.type_url, version, MappingProxyType({**self.items, **more.items}))


class Snapshot:
    """An immutable set of resources for CDS, EDS, LDS and RDS; a type left out has none.

    `resources` maps a type URL (see resource_types) to protobuf messages of that type.
    Raises TypeError for a message of the wrong type and ValueError for one unnamed or named
    twice, naming the type and the resource.
    """

    def __init__(self, version: str, resources: Mapping[str, Iterable[Message]] | None = None) -> None:
        if not version:
            raise ValueError("a snapshot needs a non-empty version")
        resources = resources or {}
        unknown = set(resources) - set(resource_types.ORDER)
        if unknown:
            raise ValueError(f"snapshot {version}: unsupported resource types {sorted(unknown)}")
        self.version = version
        self._types: Mapping[str, TypeResources] = MappingProxyType({
            type_url: TypeResources(type_url, version, _pack(type_url, resources.get(type_url, ()), version))
            for type_url in resource_types.ORDER
        })

    @classmethod
    def of_types(cls, version: str, types: Mapping[str, TypeResources]) -> Snapshot:
        """A snapshot made of TypeResources built beforehand (each keeps its own version, and
        may be shared with other snapshots: sidecars differ mostly in their listeners)."""
        if not version:
            raise ValueError("a snapshot needs a non-empty version")
        unknown = set(types) - set(resource_types.ORDER)
        if unknown:
            raise ValueError(f"snapshot {version}: unsupported resource types {sorted(unknown)}")
        for type_url, resources in types.items():
            if resources.type_url != type_url:
                raise ValueError(f"snapshot {version}: {resources.type_url} given as {type_url}")
        result = object.__new__(cls)
        result.version = version
        result._types = MappingProxyType({
            type_url: types.get(type_url) or TypeResources(type_url, version, MappingProxyType({}))
            for type_url in resource_types.ORDER
        })
        return result

    def __repr__(self) -> str:
        counts = ", ".join(f"{resource_types.SHORT_NAMES[t]}={len(r.items)}" for t, r in self._types.items())
        return f"Snapshot(version={self.version!r}, {counts})"

    def of_type(self, type_url: str) -> TypeResources:
        return self._types[type_url]

    def carrying_over(self, previous: Snapshot | None) -> Snapshot:
        """This snapshot, except that each type whose content equals `previous`'s keeps
        previous's object and version, so that streams do not resend unchanged types."""
        if previous is None or previous is self:
            return self
        result = object.__new__(Snapshot)
        result.version = self.version
        result._types = MappingProxyType({
            type_url: before if resources.same_content(before := previous.of_type(type_url)) else resources
            for type_url, resources in self._types.items()
        })
        return result


def _pack(type_url: str, messages: Iterable[Message], version: str) -> Mapping[str, AnyMessage]:
    expected = resource_types.MESSAGE_TYPES[type_url]
    label = resource_types.SHORT_NAMES[type_url]
    packed: dict[str, AnyMessage] = {}
    for position, message in enumerate(messages):
        if not isinstance(message, expected):
            raise TypeError(
                f"snapshot {version}: {label} resource [{position}] is a {type(message).__name__},"
                f" not a {expected.DESCRIPTOR.name}"
            )
        name = resource_types.resource_name(message)
        if not name:
            raise ValueError(f"snapshot {version}: {label} resource [{position}] has no name")
        if name in packed:
            raise ValueError(f'snapshot {version}: {label} resource "{name}" appears twice')
        # Deterministic bytes so that equal resources compare equal across snapshots.
        packed[name] = AnyMessage(type_url=type_url, value=message.SerializeToString(deterministic=True))
    return MappingProxyType(packed)


class SnapshotCache:
    """The current snapshot per node (or one for every node without its own), and what each node
    did with what it was sent.

    Call its methods from the trio thread that runs serve_ads (use trio.from_thread.run_sync from
    other threads): setting a snapshot wakes the ADS streams directly.
    """

    def __init__(self) -> None:
        self._default: Snapshot | None = None
        self._by_node: dict[str, Snapshot] = {}
        self._watchers: set[Callable[[], None]] = set()
        self.acks = AckStatus()

    def set_snapshot(self, snapshot: Snapshot, node_id: str | None = None) -> None:
        """Make `snapshot` current for `node_id` (None: every node without a snapshot of its own)
        and push the types that changed to every connected stream."""
        previous = self._default if node_id is None else self._by_node.get(node_id, self._default)
        current = snapshot.carrying_over(previous)
        if node_id is None:
            self._default = current
        else:
            self._by_node[node_id] = current
        self._notify()

    def clear_snapshot(self, node_id: str) -> None:
        """Forget a node's own snapshot; the node falls back to the default one."""
        if self._by_node.pop(node_id, None) is not None:
            self._notify()

    def snapshot_for(self, node_id: str) -> Snapshot | None:
        return self._by_node.get(node_id, self._default)

    def status(self) -> dict[str, dict[str, dict[str, str | None]]]:
        """{node_id: {type_url: {"acked_version", "nacked_version", "error"}}} for every node seen."""
        return self.acks.as_dict()

    def watch(self, wake: Callable[[], None]) -> Callable[[], None]:
        """Call `wake()` after every change; returns the function that stops it."""
        self._watchers.add(wake)
        return lambda: self._watchers.discard(wake)

    def _notify(self) -> None:
        for wake in list(self._watchers):
            wake()
