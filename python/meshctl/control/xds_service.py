"""The control plane's xDS side: the ADS server, and the task that recompiles the mesh whenever the
store or the registry changes and pushes each sidecar its own snapshot."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import trio
from envoy.config.core.v3.base_pb2 import DataSource
from envoy.extensions.transport_sockets.tls.v3.common_pb2 import CertificateValidationContext
from envoy.extensions.transport_sockets.tls.v3.secret_pb2 import Secret
from google.protobuf.any_pb2 import Any as AnyMessage

from meshctl.control import resource_types as types
from meshctl.control.ads import ADS_METHOD, AdsServer, serve_ads
from meshctl.control.compiler import MeshConfig, compile_mesh, sidecar_resources, to_packed
from meshctl.control.compiler_ratelimit_global import ServiceAddress
from meshctl.control.identity_authority import IdentityAuthority
from meshctl.control.identity_grpc import IdentityHandlers, authenticated_ads
from meshctl.control.ratelimit_counters import GlobalCounters
from meshctl.control.ratelimit_service import Counters, RateLimitService, follow_rules
from meshctl.control.registry import Registry, Sidecar
from meshctl.control.snapshot import Snapshot, SnapshotCache, TypeResources
from meshctl.control.store import Store, StoreError
from meshctl.control.xds_tls import ServerTls
from meshctl.identity.ca import control_plane_id

log = logging.getLogger("meshctl.control.xds")

DEFAULT_XDS_PORT = 15012
ROOTCA = "ROOTCA"  # Istio's name for the trust bundle secret
# The kinds the compiler turns into config; the others are stored but not yet sent to sidecars.
COMPILED_KINDS = frozenset({
    "VirtualService", "DestinationRule", "ServiceEntry", "WorkloadEntry",
    "PeerAuthentication", "AuthorizationPolicy", "Fallback", "RateLimit", "Telemetry",
})  # fmt: skip


class Publisher:
    """Compiles (store snapshot, registry) and sets every registered sidecar's snapshot."""

    def __init__(self, cache: SnapshotCache) -> None:
        self.cache = cache
        self._published: set[str] = set()
        self.last_version = ""
        self.compile_seconds = 0.0
        # Version → the stored resources (ref, resource version) it was compiled from, so that a
        # sidecar's ACK or NACK of a version is recorded against them. The last few are kept.
        self.sources: dict[str, list[tuple[Any, int]]] = {}
        # The last build's per-type resources by what they were made of (see _Packer).
        self._packed: dict[tuple[Any, ...], TypeResources] = {}
        # Where sidecars ask for global rate limits: the plane's own xDS port, once it is bound.
        self.rate_limit_service: ServiceAddress | None = None

    def publish(
        self, revision: int, resources: Sequence[Any], generation: int, sidecars: Sequence[Sidecar],
        trust: TrustMaterial | None = None,
    ) -> str:
        return self.install(self.build(revision, resources, generation, sidecars, trust))

    def build(
        self, revision: int, resources: Sequence[Any], generation: int, sidecars: Sequence[Sidecar],
        trust: TrustMaterial | None = None,
    ) -> _Built:
        """Compile and make every sidecar's snapshot. Touches no shared state, so it may run in
        a worker thread while the ADS streams keep being served. With `trust`, every sidecar
        also gets its ROOTCA secret (and the version names the trust generation too)."""
        started = time.perf_counter()
        version = f"{revision}.{generation}" + (f".{trust.generation}" if trust else "")
        if self.rate_limit_service is not None:
            mesh = compile_mesh(resources, sidecars, self.rate_limit_service)
        else:
            mesh = compile_mesh(resources, sidecars)
        packer = _Packer(mesh, version, self._packed, trust)
        # Sidecars made of the same per-type resources share one snapshot.
        by_parts: dict[tuple[int, ...], Snapshot] = {}
        snapshots: dict[str, Snapshot] = {}
        for sidecar in sidecars:
            parts = packer.for_sidecar(sidecar)
            key = tuple(id(parts.get(type_url)) for type_url in types.ORDER)
            snapshot = by_parts.get(key)
            if snapshot is None:
                snapshot = by_parts[key] = Snapshot.of_types(version, parts)
            snapshots[sidecar.node_id] = snapshot
        sources = [
            (resource.ref, resource.version)
            for resource in resources
            if getattr(resource, "ref", None) is not None and resource.ref.kind in COMPILED_KINDS
        ]
        return _Built(version, snapshots, sources, len(mesh.clusters), started, packer.built)

    def install(self, built: _Built) -> str:
        """Hand the snapshots to the cache (on the trio thread that serves ADS)."""
        for node_id, snapshot in built.snapshots.items():
            self.cache.set_snapshot(snapshot, node_id)
        for node_id in self._published - built.snapshots.keys():
            # It keeps serving its last config; nothing new reaches it until it registers again.
            self.cache.clear_snapshot(node_id)
        self._published = set(built.snapshots)
        self._packed = built.packed
        self.last_version = built.version
        self.sources[built.version] = built.sources
        while len(self.sources) > 64:
            del self.sources[next(iter(self.sources))]
        self.compile_seconds = time.perf_counter() - built.started
        log.info(
            "published version %s to %d sidecars (%d clusters) in %.1f ms",
            built.version, len(built.snapshots), built.cluster_count, self.compile_seconds * 1000,
        )  # fmt: skip
        return built.version


@dataclass(frozen=True)
class TrustMaterial:
    """What every sidecar verifies peers with: the ROOTCA secret (roots + CRLs), at a generation
    that goes up whenever either changes."""

    generation: int
    bundle_pem: str
    crls_pem: str

    def rootca(self) -> tuple[str, AnyMessage]:
        secret = Secret(
            name=ROOTCA,
            validation_context=CertificateValidationContext(
                trusted_ca=DataSource(inline_string=self.bundle_pem),
                crl=DataSource(inline_string=self.crls_pem) if self.crls_pem else None,
            ),
        )
        return ROOTCA, AnyMessage(type_url=types.SECRET, value=secret.SerializeToString(deterministic=True))


@dataclass(frozen=True)
class _Built:
    version: str
    snapshots: dict[str, Snapshot]
    sources: list[tuple[Any, int]]
    cluster_count: int
    started: float
    packed: dict[tuple[Any, ...], TypeResources]


class _Packer:
    """One build's per-type resources, packed once and shared by every sidecar that has them.

    Clusters (but a sidecar's own inbound one), endpoints and the route table of a namespace are
    the same for many sidecars: each is packed once per build, and each resource dict is
    serialized only when it changed since it was last seen (compiler.packed). A TypeResources
    whose content equals the previous build's is that previous object, version and all, so
    ADS streams resend only the types that changed (a weight change: one RouteConfiguration).
    """

    def __init__(
        self, mesh: MeshConfig, version: str, previous: Mapping[tuple[Any, ...], TypeResources],
        trust: TrustMaterial | None = None,
    ) -> None:
        self.mesh = mesh
        self.version = version
        self.previous = previous
        self.trust = trust
        self.built: dict[tuple[Any, ...], TypeResources] = {}

    def for_sidecar(self, sidecar: Sidecar) -> dict[str, TypeResources]:
        documents = sidecar_resources(self.mesh, sidecar)
        shared_clusters = self.mesh.clusters_for(sidecar)
        own_clusters = to_packed(types.CLUSTER, documents[types.CLUSTER][len(shared_clusters) :])
        listeners = to_packed(types.LISTENER, documents[types.LISTENER])
        parts = {
            types.CLUSTER: self._clusters_with(own_clusters, shared_clusters),
            types.ENDPOINT: self._type(
                ("eds",), lambda: TypeResources.of_packed(
                    types.ENDPOINT, self.version, to_packed(types.ENDPOINT, self.mesh.endpoints)
                ),
            ),  # fmt: skip
            types.LISTENER: self._type(
                ("lds", *((name, item.value) for name, item in listeners)),
                lambda: TypeResources.of_packed(types.LISTENER, self.version, listeners),
            ),
            types.ROUTE: self._type(
                ("rds", sidecar.namespace),
                lambda: TypeResources.of_packed(
                    types.ROUTE, self.version, to_packed(types.ROUTE, [self.mesh.route_for(sidecar.namespace)])
                ),
            ),  # fmt: skip
        }
        if self.trust is not None:
            trust = self.trust  # one ROOTCA for every sidecar: packed once per build
            parts[types.SECRET] = self._type(
                ("sds",), lambda: TypeResources.of_packed(types.SECRET, self.version, [trust.rootca()])
            )
        return parts

    def _clusters_with(self, own: list[tuple[str, AnyMessage]], documents: list[dict[str, Any]]) -> TypeResources:
        """The shared clusters, plus the sidecar's own (its inbound cluster) if it has any.
        Sidecars without an identity share a plaintext variant when some clusters use mTLS."""
        shared_key = ("cds",) if documents is self.mesh.clusters else ("cds", "plaintext")
        shared = self._type(
            shared_key,
            lambda: TypeResources.of_packed(types.CLUSTER, self.version, to_packed(types.CLUSTER, documents)),
        )
        if not own:
            return shared
        key = (*shared_key, *((name, item.value) for name, item in own))
        found = self.built.get(key)
        if found is None:
            before = self.previous.get(key)
            if before is not None and shared is self.previous.get(shared_key):
                found = before  # neither the shared part nor the own part changed
            else:
                found = shared.extended(self.version, own)
                if before is not None and found.same_content(before):
                    found = before
            self.built[key] = found
        return found

    def _type(self, key: tuple[Any, ...], make: Callable[[], TypeResources]) -> TypeResources:
        found = self.built.get(key)
        if found is None:
            found = make()
            before = self.previous.get(key)
            if before is not None and found.same_content(before):
                found = before
            self.built[key] = found
        return found


async def follow_and_publish(
    store: Store,
    registry: Registry,
    publisher: Publisher,
    *,
    authority: IdentityAuthority | None = None,
    settle: float = 0.01,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Publish, then again after every store or registry change (bursts coalesce).

    The registry is complete before the first push, also after a restart (it restores the
    registrations kept in the store), so a restarted plane sends every sidecar the endpoints it
    already had."""
    task_status.started()
    while True:
        generation = registry.generation
        trust = None
        if authority is not None:
            trust = TrustMaterial(authority.generation, authority.bundle_pem(), authority.crls_pem())
        try:
            revision, resources = await store.snapshot()
        except StoreError as error:
            # The store is away (an etcd election): sidecars keep their config; try again soon.
            log.warning("cannot read the store to compile the mesh: %s; retrying", error)
            await trio.sleep(1.0)
            continue
        try:
            built = await trio.to_thread.run_sync(
                publisher.build, revision, resources, generation, registry.sidecars(), trust
            )
            publisher.install(built)
        except Exception:
            # A compiler bug must not take the control plane down; sidecars keep their config.
            log.exception("compiling the mesh at revision %s failed", revision)
        await _until_any_changes(store, revision, registry, generation, authority, trust)
        await trio.sleep(settle)


def _version_key(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in version.split("."))
    except ValueError:
        return (-1,)


def node_verdict(
    types_state: dict[str, dict[str, str | None]],
) -> tuple[str, bool, str | None] | None:
    """(version, accepted, reason) for one node from its ACK/NACK record: a NACK on any type
    rejects that version, naming each type's reason; else the newest version it accepted."""
    nacked = [
        (state["nacked_version"], f"{types.SHORT_NAMES.get(type_url, type_url)}: {state['error']}")
        for type_url, state in sorted(types_state.items())
        if state.get("nacked_version")
    ]
    if nacked:
        version = max((v for v, _ in nacked), key=_version_key)
        return version, False, "; ".join(reason for v, reason in nacked if v == version)
    acked = [state["acked_version"] for state in types_state.values() if state.get("acked_version")]
    if not acked:
        return None
    return max(acked, key=_version_key), True, None


async def report_statuses(
    store: Store,
    registry: Registry,
    cache: SnapshotCache,
    publisher: Publisher,
    interval: float = 0.5,
) -> None:
    """Record each sidecar's ACK or NACK against the resources its config came from (what
    `meshctl get` shows), and forget sidecars that left the registry (also those restored after
    a restart that never came back, whose statuses an earlier run of the plane wrote).

    Only what changed is written: when a sidecar takes a new version with the same verdict, the
    stored resources whose version it already answered for keep their status (with 1,000 routes,
    a weight change is a few writes per sidecar, not a thousand)."""
    reported: dict[str, tuple[str, bool, str | None]] = {}
    # Version → the (ref, resource version) pairs it came from, for the versions in `reported`.
    answered: dict[str, frozenset[tuple[Any, int]]] = {}
    # Every sidecar seen in the registry: one that leaves it has its statuses forgotten.
    seen: set[str] = set()
    while True:
        live = {sidecar.node_id for sidecar in registry.sidecars()}
        seen |= live
        for node_id, types_state in cache.status().items():
            if node_id not in live:
                continue
            verdict = node_verdict(types_state)
            if verdict is None or reported.get(node_id) == verdict:
                continue
            version, accepted, reason = verdict
            sources = publisher.sources.get(version)
            if sources is None:
                continue  # a version too old to map back; the next answer will do
            before = reported.get(node_id)
            if before is not None and before[1:] == (accepted, reason) and before[0] in answered:
                done = answered[before[0]]
                changed = [source for source in sources if source not in done]
            else:
                changed = sources
            try:
                for ref, resource_version in changed:
                    await store.set_status(ref, node_id, resource_version, accepted, reason)
            except Exception:
                log.exception("recording %s's answer to version %s", node_id, version)
                continue
            if version not in answered:
                answered[version] = frozenset(sources)
            reported[node_id] = verdict
        for node_id in seen - live:
            seen.discard(node_id)
            reported.pop(node_id, None)
            try:
                await store.forget_sidecar(node_id)
            except Exception:
                log.exception("forgetting sidecar %s", node_id)
        in_use = {verdict[0] for verdict in reported.values()}
        for version in set(answered) - in_use:
            del answered[version]
        await trio.sleep(interval)


async def _until_any_changes(
    store: Store, revision: int, registry: Registry, generation: int,
    authority: IdentityAuthority | None = None, trust: TrustMaterial | None = None,
) -> None:
    async with trio.open_nursery() as nursery:

        async def wait(waiting: Callable[[], Any]) -> None:
            await waiting()
            nursery.cancel_scope.cancel()

        nursery.start_soon(wait, lambda: store.wait_for_change(revision))
        nursery.start_soon(wait, lambda: registry.wait_for_change(generation))
        if authority is not None and trust is not None:
            # A revocation or a root rotation: every sidecar gets the new ROOTCA at once.
            nursery.start_soon(wait, lambda: authority.wait_for_change(trust.generation))


def xds_service(
    registry: Registry,
    address: str | tuple[str, int],
    *,
    authority: IdentityAuthority | None = None,
    api_token: str | None = None,
    tls: ServerTls | None = None,
    counters: Counters | None = None,
) -> Callable[[Store], Any]:
    """A run_control_plane service factory: ADS on `address`, fed from the store and `registry`.

    With `authority` (and the API token), the same port also serves the CA and registration
    methods and every sidecar gets the ROOTCA secret; with `tls`, the port is TLS (else h2c).
    It always answers the global rate limit service (ratelimit_service) over `counters` (shared
    with the API, which shows them), and sidecars are compiled to ask it there."""

    def factory(store: Store):
        async def serve(task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
            cache = SnapshotCache()
            publisher = Publisher(cache)
            server = AdsServer(cache)
            limits = counters if counters is not None else GlobalCounters()
            extra = dict(RateLimitService(limits, authority, api_token).handlers())
            if authority is not None:
                assert api_token is not None, "the CA methods need the API token (operators)"
                extra.update(IdentityHandlers(authority, registry, api_token).handlers())
                extra[ADS_METHOD] = authenticated_ads(server.stream_aggregated_resources, authority, api_token)
            async with trio.open_nursery() as nursery:
                await nursery.start(follow_rules, store, limits)
                if tls is not None:
                    await nursery.start(tls.serve)
                    authority_callbacks = authority.on_roots_changed if authority else []
                    authority_callbacks.append(tls.rebuild)
                host, port = await nursery.start(
                    functools.partial(
                        serve_ads, address, cache, server=server, more_handlers=extra,
                        ssl_context=tls.context if tls is not None else None,
                    )
                )  # fmt: skip
                shown = f"[{host}]" if ":" in host else host
                registry.xds_address = f"{shown}:{port}"
                # Sidecars reach the plane by the last name its certificate carries (an --xds-name,
                # else the listen address unless a wildcard, else 127.0.0.1).
                publisher.rate_limit_service = ServiceAddress(
                    tls.names[-1] if tls is not None else host, port, tls is not None,
                    control_plane_id(authority.ca.trust_domain) if authority is not None else ServiceAddress.identity,
                )
                # After the bind, so that the very first config names the service's address.
                await nursery.start(
                    functools.partial(follow_and_publish, authority=authority), store, registry, publisher
                )
                nursery.start_soon(report_statuses, store, registry, cache, publisher)
                if tls is not None:
                    what = "TLS, ALPN h2" + (", CA and registration" if authority else "") + ", rate limits"
                else:
                    what = "plaintext h2c: debugging only" + (", CA and registration" if authority else "")
                    what += ", rate limits"
                task_status.started(f"xDS (ADS, {what}) on {registry.xds_address}")

        return serve

    return factory
