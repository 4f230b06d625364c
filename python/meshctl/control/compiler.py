"""Mesh resources + service registry → xDS (Cluster, ClusterLoadAssignment, Listener, RouteConfiguration).

Pure functions, no I/O. `compile_mesh` does the work every sidecar shares (clusters, endpoints,
and one route table per namespace); `sidecar_resources` adds what is the sidecar's own (its
listener ports and its inbound cluster). Names follow Istio's, so configs read the same:
`outbound|PORT|SUBSET|HOST` clusters, `inbound|PORT||` for the local app, listeners
`virtualOutbound` and `virtualInbound`.

What a sidecar gets:
- for every service host and port: an EDS cluster for all its instances, and one per
  DestinationRule subset, each with a ClusterLoadAssignment of the ready instances whose labels
  the subset selects;
- an outbound listener on 127.0.0.1:OUTBOUND whose routes (RDS "outbound") have one virtual
  host per service and port, named by every form a client may use (`reviews`, `reviews.ns`,
  `reviews.ns.svc`, the FQDN; with and without the port), routing by the host's
  VirtualService, else everything to the all-instances cluster;
- for every ServiceEntry host and port: the same clusters, reached at its endpoints and the
  WorkloadEntries its workloadSelector picks (STATIC: over EDS), or by DNS (STRICT_DNS, or
  LOGICAL_DNS for DNS_ROUND_ROBIN); resolution NONE needs transparent capture, not compiled yet;
- with an app port: an inbound listener on ADDRESS:INBOUND forwarding to 127.0.0.1:APP_PORT;
- auto mTLS (compiler_mtls): a cluster whose instances all have verified identities is reached
  over mTLS (h2), and a sidecar with an identity gets a TLS inbound chain (plus plaintext unless
  its PeerAuthentication is STRICT); AuthorizationPolicies become its inbound RBAC filters
  (compiler_rbac). With no identity and no policy, everything is plaintext as before;
- under `meshctl run --capture`: see `capture_listeners`.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.any_pb2 import Any as AnyMessage
from google.protobuf.message import Message

from meshctl.agent.bootstrap import resource_to_bytes
from meshctl.control import compiler_access_log as access_log
from meshctl.control import compiler_concurrency as concurrency
from meshctl.control import compiler_fallback as fallback
from meshctl.control import compiler_fault as fault
from meshctl.control import compiler_mtls as mtls
from meshctl.control import compiler_ratelimit as ratelimit
from meshctl.control import compiler_ratelimit_global as global_ratelimit
from meshctl.control import compiler_rbac as rbac
from meshctl.control import compiler_resilience as resilience
from meshctl.control import compiler_tracing as tracing
from meshctl.control import compiler_workload as workload
from meshctl.control import resource_types as types
from meshctl.control.compiler_matchers import string_match
from meshctl.control.registry import Sidecar
from meshctl.resources.authorization_policy import AuthorizationPolicySpec
from meshctl.resources.common import duration_seconds
from meshctl.resources.destination_rule import DestinationRuleSpec
from meshctl.resources.fallback import FallbackSpec
from meshctl.resources.hosts import CLUSTER_DOMAIN, canonical_host
from meshctl.resources.peer_authentication import PeerAuthenticationSpec
from meshctl.resources.rate_limit import RateLimitSpec
from meshctl.resources.service_entry import ServiceEntrySpec, WorkloadEntrySpec
from meshctl.resources.telemetry import TelemetrySpec
from meshctl.resources.virtual_service import (
    Destination,
    HttpRoute,
    MatchRequest,
    VirtualServiceSpec,
)

OUTBOUND_LISTENER = "virtualOutbound"
INBOUND_LISTENER = "virtualInbound"
OUTBOUND_ROUTES = "outbound"
DEFAULT_SERVICE_PORT = 80
CONNECT_TIMEOUT = "5s"
# Request timeouts are off unless a VirtualService sets one, as istiod compiles them (Envoy would
# otherwise apply its own 15 s default to every route).
NO_TIMEOUT = "0s"

HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"

Json = dict[str, Any]

_LB_POLICIES = {"ROUND_ROBIN": "ROUND_ROBIN", "LEAST_REQUEST": "LEAST_REQUEST", "RANDOM": "RANDOM"}
_REDIRECT_CODES = {
    301: "MOVED_PERMANENTLY",
    302: "FOUND",
    303: "SEE_OTHER",
    307: "TEMPORARY_REDIRECT",
    308: "PERMANENT_REDIRECT",
}


def cluster_name(direction: str, port: int, subset: str | None, host: str) -> str:
    """Istio's cluster names: outbound|9080|v1|reviews.default.svc.cluster.local."""
    return f"{direction}|{port}|{subset or ''}|{host}"


@dataclass
class MeshConfig:
    """What every sidecar shares, as resource dicts. `routes` is keyed by the sidecar's namespace
    (short names like `reviews` mean the service in the caller's own namespace, as in Istio)."""

    # For callers with a verified identity: mTLS wherever every instance has one.
    clusters: list[Json] = field(default_factory=list)
    # The same clusters for callers without an identity (no certificate to present): plaintext.
    # The very same list as `clusters` when no cluster uses mTLS.
    plaintext_clusters: list[Json] = field(default_factory=list)
    endpoints: list[Json] = field(default_factory=list)
    routes: dict[str, Json] = field(default_factory=dict)
    # Which stored resources shaped the config: their refs, to report sidecars' ACKs against.
    sources: list[Any] = field(default_factory=list)
    # Security policies, oldest first: each sidecar's inbound side depends on which select it.
    peer_authentications: list[Any] = field(default_factory=list)
    authorization_policies: list[Any] = field(default_factory=list)
    # RateLimits, oldest first: a selector's rules go on the inbound side of the workloads it picks.
    rate_limits: list[Any] = field(default_factory=list)
    # The rate limit filters the outbound listeners need for the host RateLimits (none without).
    outbound_filters: list[Json] = field(default_factory=list)
    # Telemetry resources, oldest first: their accessLogging goes on the workloads they select.
    telemetries: list[Any] = field(default_factory=list)

    def clusters_for(self, sidecar: Sidecar) -> list[Json]:
        """The shared clusters as `sidecar` sees them (mTLS needs a certificate of its own)."""
        return self.clusters if sidecar.identity is not None else self.plaintext_clusters

    def route_for(self, namespace: str) -> Json:
        """The outbound route table for sidecars in `namespace` (built on demand for others)."""
        return self.routes.get(namespace) or self.routes[""]


@dataclass(frozen=True)
class _Endpoint:
    """One place traffic for a host and port can go, from the registry or a ServiceEntry."""

    address: str
    port: int
    labels: Mapping[str, str]
    weight: int | None = None
    # A registry instance's verified SPIFFE ID; callers use mTLS only if every instance has one
    # and none has PeerAuthentication DISABLE.
    identity: str | None = None
    mtls_disabled: bool = False
    # A registry instance's workload (compiler_workload.workload_fields), for Istio's metrics.
    workload: Mapping[str, str] | None = None


@dataclass
class _Backend:
    """How one host and port is reached: EDS (registry, STATIC entries) or by DNS."""

    endpoints: list[_Endpoint] = field(default_factory=list)
    dns: str | None = None  # "STRICT_DNS" or "LOGICAL_DNS"
    http2: bool = False  # h2c to the endpoints (gRPC, HTTP2)


@dataclass(frozen=True)
class _Stored:
    kind: str
    namespace: str
    name: str
    order: tuple[int, str, str]  # creation order (oldest wins a conflict), then name
    spec: Any
    ref: Any = None


def compile_mesh(
    resources: Iterable[Any], sidecars: Sequence[Sidecar],
    rate_limit_service: global_ratelimit.ServiceAddress = global_ratelimit.ServiceAddress(),
) -> MeshConfig:
    """Compile stored resources (StoredResource, or plain bodies with kind/metadata/spec) and
    every registered sidecar into the shared part of the mesh config. `rate_limit_service` is
    where global RateLimit rules are asked (the control plane's xDS port; the default one unless
    the plane says)."""
    stored = [_parse(resource, position) for position, resource in enumerate(resources)]
    virtual_services = sorted(
        (s for s in stored if s.kind == "VirtualService"), key=lambda s: s.order
    )
    rules = sorted((s for s in stored if s.kind == "DestinationRule"), key=lambda s: s.order)
    peer_authentications = sorted(
        (s for s in stored if s.kind == "PeerAuthentication"), key=lambda s: s.order
    )

    # Service host → its ports, and (host, port) → where its traffic goes: the registry's
    # ready instances, then ServiceEntries.
    ports: dict[str, set[int]] = defaultdict(set)
    backends: dict[tuple[str, int], _Backend] = defaultdict(_Backend)
    for sidecar in sidecars:
        if sidecar.app_port is not None:
            ports[sidecar.host].add(sidecar.service_port)
            backend = backends[(sidecar.host, sidecar.service_port)]
            backend.http2 = backend.http2 or sidecar.http2
            if sidecar.is_endpoint:
                disabled = sidecar.identity is not None and mtls.DISABLE == mtls.effective_mode(
                    peer_authentications, sidecar.namespace, sidecar.all_labels, sidecar.app_port
                )
                backend.endpoints.append(
                    _Endpoint(sidecar.address, sidecar.endpoint_port, sidecar.all_labels,
                              identity=sidecar.identity, mtls_disabled=disabled,
                              workload=workload.workload_fields(sidecar))
                )  # fmt: skip
    workload_entries = [s for s in stored if s.kind == "WorkloadEntry"]
    for entry in sorted((s for s in stored if s.kind == "ServiceEntry"), key=lambda s: s.order):
        _add_service_entry(entry, workload_entries, ports, backends)

    # Host → the oldest DestinationRule for it (Istio picks the oldest too).
    rule_for: dict[str, _Stored] = {}
    for rule in rules:
        rule_for.setdefault(canonical_host(rule.spec.host, rule.namespace), rule)

    # Host → the oldest VirtualService that names it.
    service_for: dict[str, _Stored] = {}
    for virtual_service in virtual_services:
        for host in virtual_service.spec.hosts:
            host = canonical_host(host, virtual_service.namespace)
            if "*" not in host:  # wildcard hosts: not compiled yet
                service_for.setdefault(host, virtual_service)

    # A VirtualService's own host gets a virtual host even before any instance registers.
    for host in service_for:
        if not ports.get(host):
            ports[host].add(DEFAULT_SERVICE_PORT)

    config = MeshConfig()
    config.sources = [s.ref for s in stored if s.ref is not None]
    config.peer_authentications = peer_authentications
    config.authorization_policies = sorted(
        (s for s in stored if s.kind == "AuthorizationPolicy"), key=lambda s: s.order
    )
    config.rate_limits = sorted((s for s in stored if s.kind == "RateLimit"), key=lambda s: s.order)
    config.telemetries = sorted((s for s in stored if s.kind == "Telemetry"), key=lambda s: s.order)
    limited = ratelimit.rules_by_host(config.rate_limits)
    config.outbound_filters = ratelimit.listener_filters(limited.values())
    namespaces = {"", *(s.namespace for s in sidecars)}
    for namespace in sorted(namespaces):
        config.routes[namespace] = _route_table(namespace, ports, service_for)
        if any(telemetry.spec.tracing for telemetry in config.telemetries):
            tracing.decorate_routes(config.routes[namespace])
        for virtual_host in config.routes[namespace]["virtual_hosts"]:
            rules = limited.get(virtual_host["name"].rpartition(":")[0], [])
            ratelimit.limit_virtual_host(virtual_host, ratelimit.for_caller_namespace(rules, namespace))

    # Clusters: every host and port's all-instances cluster and its subsets, plus anything a
    # route names (a route to a missing cluster is refused; an empty one answers 503 naming it).
    wanted: dict[tuple[str, int], set[str | None]] = {}
    for host, host_ports in ports.items():
        rule = rule_for.get(host)
        for port in host_ports:
            wanted[(host, port)] = {
                None,
                *(s.name for s in ((rule.spec.subsets or []) if rule else [])),
            }
    for table in config.routes.values():
        for name in _referenced_clusters(table):
            _, port, subset, host = name.split("|", 3)
            wanted.setdefault((host, int(port)), {None}).add(subset or None)
    # Host → its Fallback; the degraded destinations they name are clusters too.
    guarded = fallback.guarded_hosts(sorted((s for s in stored if s.kind == "Fallback"), key=lambda s: s.order))
    for (host, port) in [key for key in wanted if key[0] in guarded]:
        target = fallback.destination(guarded[host], port)
        if target is not None:
            to_host, to_port, to_subset = target
            wanted.setdefault((to_host, to_port), {None}).add(to_subset)
    plaintext_clusters: list[Json] = []
    any_mtls = False
    for host, port in sorted(wanted):
        rule = rule_for.get(host)
        subsets = {s.name: s for s in (rule.spec.subsets or [])} if rule else {}
        policy = rule.spec.traffic_policy if rule else None
        backend = backends.get((host, port)) or _Backend()
        for subset_name in sorted(wanted[(host, port)], key=lambda n: n or ""):
            name = cluster_name("outbound", port, subset_name, host)
            subset = subsets.get(subset_name) if subset_name else None
            selector = (subset.labels or {}) if subset else {}
            if subset_name and subset is None:
                selector = {"version": subset_name}  # unreachable after validation; Istio's habit
            chosen = [e for e in backend.endpoints if _selects(selector, e.labels)]
            applied = resilience.cluster_policy(policy, subset.traffic_policy if subset else None, port)
            identities = None
            if backend.dns:
                cluster = _dns_cluster(name, backend.dns, chosen, applied)
            else:
                cluster = _eds_cluster(name, applied)
                config.endpoints.append(_assignment(name, chosen))
                identities = _mtls_identities(chosen)
            resilience.apply_cluster_policy(cluster, applied)
            if host in guarded and not fallback.is_target(guarded[host], name, cluster_name):
                cluster["metadata"] = fallback.metadata(guarded[host], port, cluster_name)
            workload.with_cluster_services(cluster, host)
            plaintext = _with_http2(cluster) if backend.http2 else cluster
            plaintext_clusters.append(plaintext)
            if identities:
                secure = _with_http2(copy.deepcopy(plaintext))  # h2 between sidecars, whatever the app speaks
                server_name = mtls.sni(port, subset_name, host)
                secure["transport_socket"] = mtls.upstream_tls(server_name, identities)
                config.clusters.append(secure)
                any_mtls = True
            else:
                config.clusters.append(plaintext)
    config.plaintext_clusters = plaintext_clusters if any_mtls else config.clusters
    if any(rule.scope == "global" for stored in config.rate_limits for rule in stored.spec.rules):
        config.clusters, config.plaintext_clusters = global_ratelimit.with_service_cluster(
            config.clusters, config.plaintext_clusters, rate_limit_service
        )
    return config


def _add_service_entry(
    entry: _Stored,
    workload_entries: Sequence[_Stored],
    ports: dict[str, set[int]],
    backends: dict[tuple[str, int], _Backend],
) -> None:
    """A ServiceEntry's hosts and ports, reached at its endpoints (inline and the WorkloadEntries
    its workloadSelector picks in its namespace), or by DNS. Resolution NONE (pass through to
    the original destination) needs transparent capture and is not compiled yet."""
    spec: ServiceEntrySpec = entry.spec
    resolution = spec.resolution or (
        "STATIC" if spec.endpoints or spec.workload_selector else "NONE"
    )
    if resolution == "NONE" or not spec.ports:
        return
    workloads: list[WorkloadEntrySpec] = list(spec.endpoints or [])
    if spec.workload_selector is not None:
        workloads += [
            we.spec
            for we in sorted(workload_entries, key=lambda we: we.order)
            if we.namespace == entry.namespace
            and _selects(spec.workload_selector.labels, we.spec.labels or {})
        ]
    for raw_host in spec.hosts:
        host = canonical_host(raw_host, entry.namespace)
        if "*" in host:
            continue  # wildcard hosts: not compiled yet
        for port in spec.ports:
            ports[host].add(port.number)
            backend = backends[(host, port.number)]
            backend.http2 = backend.http2 or port.protocol in ("HTTP2", "GRPC")
            target = port.target_port or port.number
            found = [
                _Endpoint(
                    workload.address,
                    (workload.ports or {}).get(port.name or "", target),
                    workload.labels or {},
                    workload.weight,
                )
                for workload in workloads
            ]
            if resolution in ("DNS", "DNS_ROUND_ROBIN"):
                if backend.endpoints and not backend.dns:
                    continue  # the registry's instances of this host win
                backend.dns = "LOGICAL_DNS" if resolution == "DNS_ROUND_ROBIN" else "STRICT_DNS"
                # Without endpoints, the host name itself is resolved.
                found = found or [_Endpoint(host, target, {})]
                if backend.dns == "LOGICAL_DNS":
                    found = found[:1]  # LOGICAL_DNS takes one name
            backend.endpoints.extend(found)


def _mtls_identities(endpoints: Sequence[_Endpoint]) -> list[str] | None:
    """The identities to expect from a cluster's instances when it can use mTLS: all of them
    verified and none with mTLS disabled; else None (plaintext, as before mTLS)."""
    if not endpoints or any(e.identity is None or e.mtls_disabled for e in endpoints):
        return None
    return [e.identity for e in endpoints if e.identity is not None]


def _referenced_clusters(table: Json) -> Iterable[str]:
    for virtual_host in table["virtual_hosts"]:
        for route in virtual_host["routes"]:
            action = route.get("route")
            if action is None:
                continue
            if "cluster" in action:
                yield action["cluster"]
            for weighted in action.get("weighted_clusters", {}).get("clusters", []):
                yield weighted["name"]
            for mirror in action.get("request_mirror_policies", []):
                yield mirror["cluster"]


def sidecar_resources(mesh: MeshConfig, sidecar: Sidecar) -> dict[str, list[Json]]:
    """The xDS resources (as dicts, by type URL) for one sidecar."""
    clusters = list(mesh.clusters_for(sidecar))
    listeners = [_outbound_listener(sidecar.outbound_port, mesh.outbound_filters)]
    if sidecar.app_port is not None and sidecar.inbound_port is not None:
        local = cluster_name("inbound", sidecar.app_port, None, "")
        local_cluster = _static_cluster(local, "127.0.0.1", sidecar.app_port)
        clusters.append(_with_http2(local_cluster) if sidecar.http2 else local_cluster)
        inbound_routes = [{"match": {"prefix": "/"}, "route": {"cluster": local, "timeout": NO_TIMEOUT}}]
        limits = concurrency.rules_for_workload(mesh.rate_limits, sidecar.namespace, sidecar.all_labels)
        clusters += concurrency.limit_inbound(local_cluster, inbound_routes, limits)
        inbound = _inbound_listener(mesh, sidecar, sidecar.inbound_port, inbound_routes)
        if inbound is not None:  # None: STRICT without an identity refuses every caller
            listeners.append(inbound)
    if sidecar.capture:
        listeners = capture_listeners(mesh, listeners)
    # Istio's standard metrics: the inbound side reports as destination, every other as source.
    listeners = [
        workload.with_istio_stats(listener, sidecar, "destination" if listener["name"] == INBOUND_LISTENER else "source")
        for listener in listeners
    ]
    if mesh.telemetries:
        logs_for = {
            direction: access_log.access_logs(mesh.telemetries, sidecar.namespace, sidecar.all_labels, direction)
            for direction in (access_log.CLIENT, access_log.SERVER)
        }
        logs_for[INBOUND_LISTENER] = logs_for[access_log.SERVER]
        listeners = access_log.with_access_logs(listeners, logs_for)
        traced, collectors = tracing.sidecar_tracing(mesh.telemetries, sidecar)
        if traced:
            listeners = tracing.with_tracing(listeners, traced, INBOUND_LISTENER, f"{sidecar.host}:{sidecar.service_port}/*")
            known = {cluster["name"] for cluster in clusters}
            clusters += [cluster for cluster in collectors if cluster["name"] not in known]
    return {
        types.CLUSTER: clusters,
        types.ENDPOINT: list(mesh.endpoints),
        types.LISTENER: listeners,
        types.ROUTE: [mesh.route_for(sidecar.namespace)],
    }


def to_messages(resources: Mapping[str, list[Json]]) -> dict[str, list[Message]]:
    """Resource dicts → protobuf messages (what snapshot.Snapshot takes)."""
    return {
        type_url: [
            types.MESSAGE_TYPES[type_url].FromString(packed(type_url, document).value)
            for document in documents
        ]
        for type_url, documents in resources.items()
    }


def to_packed(type_url: str, documents: Iterable[Json]) -> list[tuple[str, AnyMessage]]:
    """Resource dicts → (name, packed Any) pairs (what snapshot.TypeResources.of_packed takes).
    An unchanged resource comes back as the very Any it was packed into before."""
    name_field = "cluster_name" if type_url == types.ENDPOINT else "name"
    return [(document.get(name_field, ""), packed(type_url, document)) for document in documents]


# Most resources are the same from one compile to the next (a weight change touches one route
# table), and json_format is the slow part of a compile: resource dicts already serialized are
# looked up by their JSON text instead. The cache holds the packed Any itself, so snapshots of
# every sidecar and of successive versions share one object (and one copy of the bytes) per
# distinct resource, and tell an unchanged resource by identity.
_PACKED: dict[tuple[Any, ...], AnyMessage] = {}
_PACKED_LIMIT = 50_000


def packed(type_url: str, document: Json) -> AnyMessage:
    """One resource dict serialized (deterministically) and packed as an Any of `type_url`."""
    if type_url == types.ROUTE and document.keys() == {"name", "virtual_hosts"}:
        # A route table is one resource, but a change touches one of its (maybe thousands of)
        # virtual hosts: those are serialized one by one, and only when new.
        hosts = [_cached_bytes(VIRTUAL_HOST_TYPE, host) for host in document["virtual_hosts"]]
        key = (type_url, hashlib.blake2b(b"".join(hosts), digest_size=16).digest(), document["name"])
        found = _PACKED.get(key)
        if found is None:
            head = resource_to_bytes(type_url, {"name": document["name"]})
            # RouteConfiguration.virtual_hosts is field 2 (length-delimited); appended after the
            # name (field 1), these are the bytes a deterministic serialization of the whole gives.
            value = head + b"".join(_VIRTUAL_HOSTS_TAG + _varint(len(host)) + host for host in hosts)
            found = _remember(key, AnyMessage(type_url=type_url, value=value))
        return found
    text = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    key = (type_url, hashlib.blake2b(text, digest_size=16).digest())
    found = _PACKED.get(key)
    if found is None:
        found = _remember(key, AnyMessage(type_url=type_url, value=resource_to_bytes(type_url, document)))
    return found


VIRTUAL_HOST_TYPE = "type.googleapis.com/envoy.config.route.v3.VirtualHost"
_VIRTUAL_HOSTS_TAG = bytes([(2 << 3) | 2])


def _cached_bytes(type_url: str, document: Json) -> bytes:
    return packed(type_url, document).value


def _remember(key: tuple[Any, ...], found: AnyMessage) -> AnyMessage:
    if len(_PACKED) >= _PACKED_LIMIT:
        _PACKED.clear()
    _PACKED[key] = found
    return found


def _varint(number: int) -> bytes:
    out = bytearray()
    while number >= 0x80:
        out.append((number & 0x7F) | 0x80)
        number >>= 7
    out.append(number)
    return bytes(out)


# --- resources -------------------------------------------------------------------------------


def _parse(resource: Any, position: int) -> _Stored:
    body = getattr(resource, "body", resource)
    ref = getattr(resource, "ref", None)
    created = getattr(resource, "created_version", position)
    kind = body["kind"]
    metadata = body.get("metadata", {})
    namespace = metadata.get("namespace", "default")
    name = metadata.get("name", "")
    spec_type = _SPEC_TYPES.get(kind)
    spec = _parsed_spec(kind, spec_type, body.get("spec", {})) if spec_type else body.get("spec")
    return _Stored(kind, namespace, name, (created, namespace, name), spec, ref)


_SPEC_TYPES = {
    "VirtualService": VirtualServiceSpec,
    "DestinationRule": DestinationRuleSpec,
    "ServiceEntry": ServiceEntrySpec,
    "WorkloadEntry": WorkloadEntrySpec,
    "PeerAuthentication": PeerAuthenticationSpec,
    "AuthorizationPolicy": AuthorizationPolicySpec,
    "Fallback": FallbackSpec,
    "RateLimit": RateLimitSpec,
    "Telemetry": TelemetrySpec,
}
# Validated specs by their JSON text: a compile re-reads every stored resource, but a change
# touches few of them. The compiler only reads specs, so one parsed object serves every compile.
_SPECS: dict[tuple[str, str], Any] = {}
_SPECS_LIMIT = 50_000


def _parsed_spec(kind: str, spec_type: Any, spec: Any) -> Any:
    try:
        key = (kind, json.dumps(spec, sort_keys=True, separators=(",", ":")))
    except (TypeError, ValueError):
        return spec_type.model_validate(spec)  # not JSON (a test's odd body): no caching
    found = _SPECS.get(key)
    if found is None:
        if len(_SPECS) >= _SPECS_LIMIT:
            _SPECS.clear()
        found = _SPECS[key] = spec_type.model_validate(spec)
    return found


def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


# --- clusters and endpoints ----------------------------------------------------------------


def _eds_cluster(name: str, policy: resilience.ClusterPolicy) -> Json:
    cluster: Json = {
        "name": name,
        "type": "EDS",
        "connect_timeout": CONNECT_TIMEOUT,
        "eds_cluster_config": {"eds_config": {"ads": {}, "resource_api_version": "V3"}},
    }
    simple = policy.load_balancer.simple if policy.load_balancer else None
    if simple:
        cluster["lb_policy"] = _LB_POLICIES[simple]
    return cluster


def _dns_cluster(
    name: str, kind: str, endpoints: Sequence[_Endpoint], policy: resilience.ClusterPolicy
) -> Json:
    cluster = _eds_cluster(name, policy)
    del cluster["eds_cluster_config"]
    cluster["type"] = kind
    cluster["load_assignment"] = _assignment(name, endpoints)
    return cluster


def _with_http2(cluster: Json) -> Json:
    """Upstream HTTP/2 (h2c): what gRPC and HTTP2 services speak."""
    resilience.protocol_options(cluster)["explicit_http_config"] = {"http2_protocol_options": {}}
    return cluster


def _static_cluster(name: str, address: str, port: int) -> Json:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": CONNECT_TIMEOUT,
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(address, port)}}]}],
        },
    }


def _assignment(name: str, members: Sequence[_Endpoint]) -> Json:
    endpoints = []
    for member in sorted(members, key=lambda e: (e.address, e.port)):
        endpoint: Json = {"endpoint": {"address": _address(member.address, member.port)}}
        if member.weight:
            endpoint["load_balancing_weight"] = member.weight
        if member.workload is not None:
            endpoint["metadata"] = workload.endpoint_metadata(dict(member.workload))
        endpoints.append(endpoint)
    assignment: Json = {"cluster_name": name}
    if endpoints:
        assignment["endpoints"] = [{"lb_endpoints": endpoints}]
    return assignment


def _address(host: str, port: int | None) -> Json:
    return {"socket_address": {"address": host, "port_value": port}}


# --- listeners -----------------------------------------------------------------------------


def _http_manager(
    stat_prefix: str, *, rds: str | None = None, routes: Json | None = None, outbound: bool = False
) -> Json:
    config: Json = {
        "@type": HCM_TYPE,
        "stat_prefix": stat_prefix,
        "codec_type": "AUTO",
        "http_filters": [
            {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_TYPE}}
        ],
    }
    if outbound:
        # As istiod: every sidecar outbound listener has the fault filter; routes configure it.
        config["http_filters"].insert(0, fault.fault_filter())
    if rds is not None:
        config["rds"] = {
            "route_config_name": rds,
            "config_source": {"ads": {}, "resource_api_version": "V3"},
        }
    else:
        config["route_config"] = routes
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": config}


def _outbound_listener(port: int, filters: Sequence[Json] = ()) -> Json:
    manager = ratelimit.insert_filters(_http_manager("outbound", rds=OUTBOUND_ROUTES, outbound=True), filters)
    return {
        "name": OUTBOUND_LISTENER,
        "address": _address("127.0.0.1", port),
        "filter_chains": [{"filters": [manager]}],
    }


def _inbound_listener(mesh: MeshConfig, sidecar: Sidecar, port: int, inbound_routes: list[Json]) -> Json | None:
    routes = {
        "name": "inbound",
        "virtual_hosts": [{"name": "inbound", "domains": ["*"], "routes": inbound_routes}],
    }
    limits = ratelimit.rules_for_workload(mesh.rate_limits, sidecar.namespace, sidecar.all_labels)
    ratelimit.limit_virtual_host(routes["virtual_hosts"][0], limits)
    manager = ratelimit.insert_filters(_http_manager("inbound", routes=routes), ratelimit.listener_filters([limits]))
    # After the rate limits: a request they refuse never counts against the adaptive limit.
    adaptive = concurrency.adaptive_filters(concurrency.rules_for_workload(mesh.rate_limits, sidecar.namespace, sidecar.all_labels))
    manager = ratelimit.insert_filters(manager, adaptive)
    policies = rbac.selecting(mesh.authorization_policies, sidecar.namespace, sidecar.all_labels)
    # A rule on the caller's identity reads the XFCC header, which hardening makes the sidecar's own.
    if sidecar.identity is not None or policies or ratelimit.uses_source(limits):
        # A policy names the workload by its app or service port; requests arrive on the inbound
        # `port`, or (redirected by --capture) with the app port as their original destination.
        arrive_on = (port,) if sidecar.app_port is None else (port, sidecar.app_port)
        local_ports = {sidecar.service_port: arrive_on}
        if sidecar.app_port is not None:
            local_ports[sidecar.app_port] = arrive_on
        manager = rbac.harden(manager, rbac.rbac_filters(policies, local_ports))
    mode = mtls.effective_mode(
        mesh.peer_authentications, sidecar.namespace, sidecar.all_labels, sidecar.app_port
    )
    chains, listener_filters = mtls.inbound_chains(manager, sidecar.identity, mode)
    if not chains:
        return None
    listener: Json = {
        "name": INBOUND_LISTENER,
        "address": _address(sidecar.address, port),
        "filter_chains": chains,
    }
    if listener_filters:
        listener["listener_filters"] = listener_filters
    return listener


def capture_listeners(mesh: MeshConfig, listeners: list[Json]) -> list[Json]:
    """A sidecar under `meshctl run --capture` (iptables REDIRECT, as Istio's pods): the outbound
    listener recovers each connection's original destination (use_original_dst) and hands it to
    a listener 0.0.0.0_PORT (bind_to_port false) for every mesh service port, which routes by
    Host like the outbound listener; the inbound listener takes redirected connections on every
    address. A captured connection to any other port stays on the outbound listener."""
    captured = []
    for listener in listeners:
        if listener["name"] == OUTBOUND_LISTENER:
            listener = {**listener, "use_original_dst": True}
        elif listener["name"] == INBOUND_LISTENER:
            port = listener["address"]["socket_address"]["port_value"]
            listener = {**listener, "address": _address("0.0.0.0", port)}
        captured.append(listener)
    ports = {int(c["name"].split("|")[1]) for c in mesh.clusters if c["name"].startswith("outbound|")}
    for port in sorted(ports):
        captured.append({
            "name": f"0.0.0.0_{port}",
            "address": _address("0.0.0.0", port),
            "bind_to_port": False,
            "filter_chains": [{"filters": [ratelimit.insert_filters(
                _http_manager(f"outbound_0.0.0.0_{port}", rds=OUTBOUND_ROUTES, outbound=True), mesh.outbound_filters)]}],
        })  # fmt: skip
    return captured


# --- routes --------------------------------------------------------------------------------


def host_aliases(host: str, namespace: str) -> list[str]:
    """The names a client in `namespace` may call `host` by: the FQDN, and for a service of this
    mesh (NAME.NS.svc.cluster.local) NAME.NS.svc, NAME.NS, and NAME if NS is the client's."""
    suffix = f".{CLUSTER_DOMAIN}"
    if not host.endswith(suffix):
        return [host]
    name, _, service_namespace = host[: -len(suffix)].rpartition(".")
    if not name:
        return [host]
    aliases = [host, f"{name}.{service_namespace}.svc", f"{name}.{service_namespace}"]
    if service_namespace == namespace:
        aliases.append(name)
    return aliases


def _route_table(
    namespace: str, ports: Mapping[str, set[int]], service_for: Mapping[str, _Stored]
) -> Json:
    virtual_hosts: list[Json] = []
    for host in sorted(ports):
        host_ports = sorted(ports[host])
        # A Host without a port means port 80; a service without port 80 takes it at its lowest.
        bare_port = DEFAULT_SERVICE_PORT if DEFAULT_SERVICE_PORT in host_ports else host_ports[0]
        virtual_service = service_for.get(host)
        for port in host_ports:
            aliases = host_aliases(host, namespace)
            domains = [f"{alias}:{port}" for alias in aliases]
            if port == bare_port:
                domains = aliases + domains
            if virtual_service is not None:
                routes = _virtual_service_routes(virtual_service, port)
            else:
                action: Json = {"cluster": cluster_name("outbound", port, None, host), "timeout": NO_TIMEOUT}
                action["retry_policy"] = resilience.retry_policy(None)  # Istio's default policy
                routes = [{"match": {"prefix": "/"}, "route": action}]
            virtual_hosts.append({"name": f"{host}:{port}", "domains": domains, "routes": routes})
    return {"name": OUTBOUND_ROUTES, "virtual_hosts": virtual_hosts}


def _virtual_service_routes(virtual_service: _Stored, port: int) -> list[Json]:
    spec: VirtualServiceSpec = virtual_service.spec
    routes: list[Json] = []
    for http in spec.http:
        action = _action(http, virtual_service.namespace, port)
        for match in http.match or [None]:
            route: Json = {"match": _match(match), **action}
            if http.name:
                route["name"] = http.name
            _add_header_operations(route, http)
            fault.add_fault(route, http)
            routes.append(route)
    return routes


def _match(match: MatchRequest | None) -> Json:
    result: Json = {"prefix": "/"}
    if match is None:
        return result
    if match.uri is not None:
        if match.uri.exact is not None:
            result = {"path": match.uri.exact}
        elif match.uri.prefix is not None:
            result = {"prefix": match.uri.prefix}
        else:
            result = {"safe_regex": {"regex": match.uri.regex}}
    headers = [
        {"name": name, "string_match": string_match(value)}
        for name, value in sorted((match.headers or {}).items())
    ]
    if match.method is not None:
        headers.append({"name": ":method", "string_match": string_match(match.method)})
    if headers:
        result["headers"] = headers
    return result




def _action(http: HttpRoute, namespace: str, port: int) -> Json:
    if http.redirect is not None:
        redirect: Json = {}
        if http.redirect.uri is not None:
            redirect["path_redirect"] = http.redirect.uri
        if http.redirect.authority is not None:
            redirect["host_redirect"] = http.redirect.authority
        if http.redirect.redirect_code is not None:
            redirect["response_code"] = _REDIRECT_CODES[http.redirect.redirect_code]
        return {"redirect": redirect}
    def cluster_for(destination: Destination) -> str:
        host = canonical_host(destination.host, namespace)
        target_port = destination.port.number if destination.port else port
        return cluster_name("outbound", target_port, destination.subset, host)

    targets = [(cluster_for(d.destination), d.weight) for d in http.route or []]
    action: Json
    if len(targets) == 1:
        action = {"cluster": targets[0][0]}
    else:
        # Two destinations may name one cluster (a subset twice): their weights add up.
        weights: dict[str, int] = {}
        for name, weight in targets:
            weights[name] = weights.get(name, 0) + (weight or 0)
        action = {
            "weighted_clusters": {
                "clusters": [{"name": n, "weight": w} for n, w in weights.items()]
            }
        }
        if len(weights) == 1:
            action = {"cluster": next(iter(weights))}
    action["timeout"] = f"{duration_seconds(http.timeout):.3f}s" if http.timeout is not None else NO_TIMEOUT
    retry_policy = resilience.retry_policy(http.retries)
    if retry_policy is not None:
        action["retry_policy"] = retry_policy
    mirrors = fault.mirror_policies(http, cluster_for)
    if mirrors:
        action["request_mirror_policies"] = mirrors
    if http.rewrite is not None:
        if http.rewrite.uri is not None:
            action["prefix_rewrite"] = http.rewrite.uri
        if http.rewrite.authority is not None:
            action["host_rewrite_literal"] = http.rewrite.authority
    return {"route": action}


def _add_header_operations(route: Json, http: HttpRoute) -> None:
    if http.headers is None:
        return
    for direction, operations in (
        ("request", http.headers.request),
        ("response", http.headers.response),
    ):
        if operations is None:
            continue
        additions = [
            {"header": {"key": k, "value": v}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
            for k, v in (operations.set or {}).items()
        ] + [
            {"header": {"key": k, "value": v}, "append_action": "APPEND_IF_EXISTS_OR_ADD"}
            for k, v in (operations.add or {}).items()
        ]
        if additions:
            route[f"{direction}_headers_to_add"] = additions
        if operations.remove:
            route[f"{direction}_headers_to_remove"] = list(operations.remove)
