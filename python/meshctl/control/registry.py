"""The service registry: each sidecar's registration (service, version, ports, labels) under a lease.

A sidecar's agent registers as soon as it starts (so the control plane can compile its listeners)
and says `ready` once its application's port answers; only ready instances become endpoints.
The agent renews the registration well within the lease; one that is not renewed is dropped by
`serve()` at most one sweep interval after its lease ran out (≤ 2× the lease in all).

Served from memory, and kept in the store so that a restarted control plane knows every instance
at once, before any has renewed: a plane that forgot them would push endpoint sets missing live
instances (traffic to a service whose instances had not renewed yet would fail). With a SQLite
store (one plane), `restore()` loads what `put()` kept there (changes only: a plain renewal
writes nothing). With an etcd store (several planes), `share()` keeps every registration in etcd
(store_etcd.put_registration) and follows the others' there, so each plane knows the instances
registered with any plane; each entry carries its wall-clock expiry (≤ 2× the lease in all).

A plane that was down cannot tell which instances renewed meanwhile, so every registration it
finds when it starts gets a full lease from then: an instance that died while the plane was down
leaves the endpoints within lease + sweep (< 2× the lease) after the plane is back.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import trio

from meshctl.control.ratelimit_local_counts import LocalRuleCounts
from meshctl.control.store import StoreError
from meshctl.resources.hosts import canonical_host

log = logging.getLogger("meshctl.control.registry")

DEFAULT_LEASE_SECONDS = 10.0
PROTOCOLS = ("HTTP", "HTTP2", "GRPC")
HTTP2_PROTOCOLS = frozenset({"HTTP2", "GRPC"})
MIN_LEASE_SECONDS = 0.5
MAX_LEASE_SECONDS = 3600.0

_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(\d{1,5})$")
_NODE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,252}$")


# The store's record space where a single plane keeps its registrations (see restore()).
REGISTRATIONS_SPACE = "registrations"


class RegistrationError(ValueError):
    """A registration body that cannot be accepted; str() names the field and the reason."""


@dataclass(frozen=True)
class Sidecar:
    """One sidecar and the instance it fronts. `app_port` None: a sidecar with no inbound side
    (a pure client); it still gets the mesh's outbound config but is never an endpoint."""

    node_id: str
    service: str
    namespace: str = "default"
    version: str = ""
    address: str = "127.0.0.1"
    service_port: int = 80
    app_port: int | None = None
    inbound_port: int | None = None
    outbound_port: int = 15001
    labels: Mapping[str, str] = field(default_factory=dict)
    ready: bool = False
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    # How the app speaks: HTTP (HTTP/1.1 upstream), HTTP2 or GRPC (h2c upstream).
    protocol: str = "HTTP"
    # Its engine's admin port (loopback on its host): where `meshctl route show` reads counters.
    admin_port: int | None = None
    # HOST:PORT serving its Prometheus metrics (/stats/prometheus), as Prometheus reaches it; None
    # from agents older than the field (prometheus_targets falls back to the admin port).
    metrics_address: str | None = None
    # `meshctl run --capture`: iptables sends the app's traffic here, so it also gets the
    # original-destination listeners (compiler.capture_listeners).
    capture: bool = False
    # The SPIFFE ID the control plane verified for this instance (from its client certificate);
    # None without one. The compiler gives mTLS only to instances that have it (auto mTLS).
    identity: str | None = None

    @property
    def http2(self) -> bool:
        return self.protocol in HTTP2_PROTOCOLS

    @property
    def host(self) -> str:
        return canonical_host(self.service, self.namespace)

    @property
    def all_labels(self) -> dict[str, str]:
        """Its labels with Istio's app= and version= (the ones DestinationRule subsets select by)."""
        labels = {"app": self.service}
        if self.version:
            labels["version"] = self.version
        labels.update(self.labels)
        return labels

    @property
    def endpoint_port(self) -> int | None:
        """Where other sidecars send its traffic: its inbound listener, else the app itself."""
        return self.inbound_port or self.app_port

    @property
    def is_endpoint(self) -> bool:
        return self.ready and self.endpoint_port is not None

    def as_json(self) -> dict[str, Any]:
        return {
            "nodeId": self.node_id,
            "service": self.service,
            "namespace": self.namespace,
            "version": self.version,
            "address": self.address,
            "servicePort": self.service_port,
            "appPort": self.app_port,
            "inboundPort": self.inbound_port,
            "outboundPort": self.outbound_port,
            "labels": dict(self.labels),
            "ready": self.ready,
            "leaseSeconds": self.lease_seconds,
            "protocol": self.protocol,
            "adminPort": self.admin_port,
            "metricsAddress": self.metrics_address,
            "capture": self.capture,
            "identity": self.identity,
        }


def parse_registration(node_id: str, body: bytes) -> Sidecar:
    """A Sidecar from a PUT /v1/sidecars/{node_id} JSON body; RegistrationError says what is wrong."""
    if not _NODE_ID.match(node_id):
        raise RegistrationError(f"node id {node_id!r}: letters, digits and ._:@- only, at most 253")
    try:
        data = json.loads(body or b"{}")
    except ValueError as error:
        raise RegistrationError(f"the body is not JSON: {error}") from None
    if not isinstance(data, dict):
        raise RegistrationError("the body must be a JSON object")
    known = {
        "service", "namespace", "version", "address", "servicePort", "appPort", "inboundPort",
        "outboundPort", "labels", "ready", "leaseSeconds", "protocol", "adminPort", "metricsAddress",
        "capture",
        "rateLimitCounts",  # not the sidecar's: registry_api records it (ratelimit_local_counts)
    }  # fmt: skip
    unknown = sorted(set(data) - known)
    if unknown:
        raise RegistrationError(f"{unknown[0]}: unknown field")
    service = _label(data, "service", required=True)
    namespace = _label(data, "namespace", default="default")
    version = data.get("version", "")
    if not isinstance(version, str) or (version and not _LABEL.match(version)):
        raise RegistrationError(f"version: {version!r} is not a DNS label")
    address = data.get("address", "127.0.0.1")
    if not isinstance(address, str) or not address:
        raise RegistrationError("address: must be a non-empty string")
    labels = data.get("labels") or {}
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        raise RegistrationError("labels: must map strings to strings")
    protocol = data.get("protocol", "HTTP")
    if protocol not in PROTOCOLS:
        raise RegistrationError(f"protocol: {protocol!r} is not one of {', '.join(PROTOCOLS)}")
    ready = data.get("ready", False)
    if not isinstance(ready, bool):
        raise RegistrationError("ready: must be true or false")
    capture = data.get("capture", False)
    if not isinstance(capture, bool):
        raise RegistrationError("capture: must be true or false")
    lease = data.get("leaseSeconds", DEFAULT_LEASE_SECONDS)
    if (
        isinstance(lease, bool)
        or not isinstance(lease, (int, float))
        or not math.isfinite(lease)
        or not MIN_LEASE_SECONDS <= lease <= MAX_LEASE_SECONDS
    ):
        raise RegistrationError(
            f"leaseSeconds: must be a number in [{MIN_LEASE_SECONDS}, {MAX_LEASE_SECONDS}]"
        )
    return Sidecar(
        node_id=node_id,
        service=service,
        namespace=namespace,
        version=version,
        address=address,
        service_port=_port(data, "servicePort", 80),
        app_port=_port(data, "appPort", None),
        inbound_port=_port(data, "inboundPort", None),
        outbound_port=_port(data, "outboundPort", 15001),
        labels=dict(labels),
        ready=ready,
        lease_seconds=float(lease),
        protocol=protocol,
        admin_port=_port(data, "adminPort", None),
        metrics_address=_host_port(data, "metricsAddress"),
        capture=capture,
    )


def sidecar_from_json(node_id: str, data: dict[str, Any]) -> Sidecar:
    """A Sidecar kept by a control plane (Sidecar.as_json), identity included. The identity was
    verified by the plane that took the registration; it is not a field a registering sidecar may
    set itself, so it is put back after parsing. RegistrationError if it does not parse."""
    body = {k: v for k, v in data.items() if k not in ("nodeId", "identity")}
    sidecar = parse_registration(node_id, json.dumps(body).encode())
    identity = data.get("identity")
    return replace(sidecar, identity=identity) if isinstance(identity, str) else sidecar


def _label(data: dict[str, Any], name: str, *, required: bool = False, default: str = "") -> str:
    value = data.get(name, None if required else default)
    if value is None:
        raise RegistrationError(f"{name}: required")
    if not isinstance(value, str) or len(value) > 63 or not _LABEL.match(value):
        raise RegistrationError(f"{name}: {value!r} is not a DNS label (lowercase, digits, '-')")
    return value


def _host_port(data: dict[str, Any], name: str) -> str | None:
    """An optional HOST:PORT ([IPv6]:PORT), as Prometheus takes a target."""
    value = data.get(name)
    if value is None:
        return None
    found = _HOST_PORT.match(value) if isinstance(value, str) else None
    if found is None or not 1 <= int(found.group(2)) <= 65535:
        raise RegistrationError(f"{name}: {value!r} is not HOST:PORT (an IPv6 host in brackets)")
    return value


def _port(data: dict[str, Any], name: str, default: int | None) -> int | None:
    value = data.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise RegistrationError(f"{name}: {value!r} is not a port in [1, 65535]")
    return value


class Registry:
    """Sidecars by node id, each with the monotonic time its lease runs out.

    `generation` goes up with every change that can alter compiled config (a new, changed,
    removed or expired sidecar; a plain renewal is not one), and `wait_for_change` wakes then.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._sidecars: dict[str, tuple[Sidecar, float]] = {}
        self.generation = 0
        self._changed = trio.Event()
        # Where the xDS server listens (HOST:PORT), told to registering agents; set once it serves.
        self.xds_address: str | None = None
        # The store registrations are shared through (an EtcdStore), once `share()` runs.
        self.shared: Any = None
        # The store a single plane keeps its registrations in (SQLite), once `restore()` runs.
        self.kept: Any = None
        # True while share() loads what etcd holds when this plane starts.
        self._starting = False
        # The local rate limit counts each sidecar reported with its renewals here: memory only,
        # dropped with its registration (another plane's sidecars report to that plane).
        self.rate_limit_counts = LocalRuleCounts()

    # --- the API's entry points: local, and shared when a store shares registrations ----------

    async def put(self, sidecar: Sidecar) -> bool:
        """Register or renew here and through the shared store (if any); True when changed.

        Here first and whatever etcd does: while the cluster elects a leader this plane's own
        instances must not expire, or its sidecars lose endpoints that are alive. The shared
        write is bounded by a third of the lease (the agent renews that often anyway)."""
        changed = self.register(sidecar)
        if changed and self.kept is not None:
            await self._keep(sidecar)
        if self.shared is not None:
            value = {"sidecar": sidecar.as_json(), "expiresAt": time.time() + sidecar.lease_seconds}
            try:
                with trio.fail_after(max(sidecar.lease_seconds / 3, 0.5)):
                    await self.shared.put_registration(sidecar.node_id, value)
            except (StoreError, trio.TooSlowError) as error:
                log.warning("sharing %s's registration: %s; the next renewal retries",
                            sidecar.node_id, str(error) or "etcd too slow")  # fmt: skip
        return changed

    async def remove(self, node_id: str) -> bool:
        known = self.deregister(node_id)
        if self.kept is not None:
            await self._forget_kept([node_id])
        if self.shared is not None:
            known = await self.shared.delete_registration(node_id) or known
        return known

    async def restore(
        self, store: Any, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """A single plane: load the registrations kept in `store` (each with a full lease from
        now), and keep every change there from now on."""
        for value in await store.list_records(REGISTRATIONS_SPACE):
            try:
                sidecar = sidecar_from_json(value["nodeId"], value)
            except (RegistrationError, KeyError, TypeError) as error:
                log.warning("ignoring a kept registration: %s", error)
                continue
            self.register(sidecar)
        if self._sidecars:
            log.info("restored %d registrations; each has a lease from now to renew", len(self._sidecars))
        self.kept = store
        task_status.started()

    async def _keep(self, sidecar: Sidecar) -> None:
        try:
            await self.kept.put_record(REGISTRATIONS_SPACE, sidecar.node_id, sidecar.as_json())
        except StoreError as error:
            log.warning("keeping %s's registration in the store: %s", sidecar.node_id, error)

    async def _forget_kept(self, node_ids: list[str]) -> None:
        try:
            await self.kept.delete_records(REGISTRATIONS_SPACE, node_ids)
        except StoreError as error:
            log.warning("removing registrations from the store: %s", error)

    async def share(
        self, store: Any, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Load every registration the store holds, then follow them until cancelled."""
        self.shared = store
        self._starting = True
        async with trio.open_nursery() as nursery:
            await nursery.start(
                functools.partial(store.follow_registrations, self._remote_put, self._remote_delete)
            )
            self._starting = False
            task_status.started()

    def _remote_put(self, node_id: str, value: dict[str, Any]) -> None:
        try:
            sidecar = sidecar_from_json(node_id, value["sidecar"])
            remaining = float(value["expiresAt"]) - time.time()
        except (RegistrationError, KeyError, TypeError, ValueError) as error:
            log.warning("ignoring shared registration %s: %s", node_id, error)
            return
        # Half a lease of grace: a renewal another plane could not write while etcd elected a
        # leader must not drop a live instance (still gone within 2x the lease of its last one).
        remaining += sidecar.lease_seconds / 2
        if self._starting:
            # An entry expired yet still in etcd when this plane starts: no plane was up to
            # renew or sweep it. A full lease from now, as restore() gives.
            remaining = max(remaining, sidecar.lease_seconds)
        if remaining <= 0:
            return  # expired already; a sweep removes the key
        previous = self._sidecars.get(node_id)
        if previous is not None and previous[1] > self._clock() + remaining:
            remaining = previous[1] - self._clock()  # our own newer renewal, not yet in etcd
        self._sidecars[node_id] = (sidecar, self._clock() + remaining)
        if previous is None or previous[0] != sidecar:
            self._bump()

    def _remote_delete(self, node_id: str) -> None:
        self.deregister(node_id)

    def register(self, sidecar: Sidecar) -> bool:
        """Create or renew; True when the registration is new or changed (not a plain renewal)."""
        previous = self._sidecars.get(sidecar.node_id)
        self._sidecars[sidecar.node_id] = (sidecar, self._clock() + sidecar.lease_seconds)
        changed = previous is None or previous[0] != sidecar
        if changed:
            self._bump()
        return changed

    def set_ready(self, node_id: str, ready: bool) -> bool:
        entry = self._sidecars.get(node_id)
        if entry is None:
            return False
        if entry[0].ready != ready:
            self._sidecars[node_id] = (replace(entry[0], ready=ready), entry[1])
            self._bump()
        return True

    def deregister(self, node_id: str) -> bool:
        self.rate_limit_counts.forget(node_id)
        if self._sidecars.pop(node_id, None) is None:
            return False
        self._bump()
        return True

    def now(self) -> float:
        """The registry's clock (leases, and the rate limit counts' samples)."""
        return self._clock()

    def get(self, node_id: str) -> Sidecar | None:
        entry = self._sidecars.get(node_id)
        return entry[0] if entry else None

    def sidecars(self) -> list[Sidecar]:
        """Every live registration, sorted by node id (deterministic compiles)."""
        return [self._sidecars[node][0] for node in sorted(self._sidecars)]

    def expire(self) -> list[str]:
        """Drop every sidecar whose lease ran out; their node ids."""
        now = self._clock()
        gone = [node for node, (_, deadline) in self._sidecars.items() if deadline <= now]
        for node in gone:
            del self._sidecars[node]
            self.rate_limit_counts.forget(node)
        if gone:
            self._bump()
        return gone

    def next_expiry(self) -> float | None:
        return min((deadline for _, deadline in self._sidecars.values()), default=None)

    async def wait_for_change(self, after: int) -> int:
        while self.generation <= after:
            await self._changed.wait()
        return self.generation

    async def serve(
        self,
        sweep_interval: float = 0.5,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Expire leases until cancelled: an instance is gone within lease + sweep_interval."""
        task_status.started()
        while True:
            await trio.sleep(sweep_interval)
            gone = self.expire()
            if gone and self.kept is not None:
                await self._forget_kept(gone)
            if self.shared is not None:
                for node_id in gone:  # any plane may clear an expired entry out of etcd
                    try:
                        await self.shared.delete_registration(node_id, only_if_expired=True)
                    except StoreError as error:
                        log.warning("clearing expired registration %s: %s", node_id, error)

    def _bump(self) -> None:
        self.generation += 1
        self._changed.set()
        self._changed = trio.Event()
