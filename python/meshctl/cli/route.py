"""`meshctl route set/show/shift`: split a service's traffic by version, see the live split the
sidecars report, and run a progressive canary that rolls itself back.

A split is an Istio VirtualService (a weighted default route, header rules ahead of it) and a
DestinationRule (one subset per version, labels version=vN), written together in one atomic
apply against the versions just read, so a concurrent change is refused, never overwritten.

The live split comes from the sidecars themselves: each registers its engine's admin port, and
its /stats/prometheus counts, per outbound cluster (outbound|PORT|SUBSET|HOST), each request's
outcome as the calling app saw it (one response per request, whatever retries it took), the
tries, retries, breaker overflows and ejected endpoints. Two scrapes a window apart give each
version's share of the requests in that window and its resilience figures. Admin endpoints are
loopback-only, so this reads the sidecars on the machine the command runs on and says how many
others it could not read.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from meshctl.cli._control_plane import (
    CaRootOption,
    ClientCertOption,
    ClientKeyOption,
    ControlPlaneOption,
    NamespaceOption,
    TokenOption,
    connect,
    fail,
)
from meshctl.cli._sidecar_scrape import read_sidecars, samples

if TYPE_CHECKING:
    from meshctl.control.client import Client

INVALID_INPUT = 2
ROLLED_BACK = 5
MAX_WATCH_INTERVALS = 5  # a shift check waits at most this many intervals for enough requests
INTERRUPTED = 130
API_VERSION = "networking.istio.io/v1"
CLUSTER_DOMAIN = "svc.cluster.local"

_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")

route_app = typer.Typer(
    help="Split a service's traffic by version: set weights and header rules, show the live "
    "split, shift progressively with automatic rollback.",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    app.add_typer(route_app, name="route")


class RouteInputError(ValueError):
    """Bad command-line input; str() says which option and why."""


# ---------------------------------------------------------------------------------------------
# Parsing the options


def parse_weights(text: str) -> dict[str, int]:
    """'v1=90,v2=10' → {'v1': 90, 'v2': 10}; whole percents summing to 100."""
    weights: dict[str, int] = {}
    for part in text.split(","):
        version, sep, number = part.strip().partition("=")
        version = version.strip()
        if not sep or not version or not number.strip():
            raise RouteInputError(
                f"--weights {text!r}: {part.strip()!r} is not VERSION=PERCENT "
                "(write e.g. --weights v1=90,v2=10)"
            )
        check_version(version, "--weights")
        if version in weights:
            raise RouteInputError(f"--weights {text!r}: {version} is given twice")
        try:
            weight = int(number.strip())
        except ValueError:
            raise RouteInputError(
                f"--weights {text!r}: {version}={number.strip()}: the weight must be a whole "
                "percent (0-100)"
            ) from None
        if not 0 <= weight <= 100:
            raise RouteInputError(f"--weights {text!r}: {version}={weight} is not in 0-100")
        weights[version] = weight
    total = sum(weights.values())
    if total != 100:
        raise RouteInputError(f"--weights {text!r}: the weights sum to {total}, not 100")
    return weights


def parse_match(text: str) -> dict[str, Any]:
    """An Istio HTTPMatchRequest from 'header:NAME=VALUE' (exact), 'header:NAME~=REGEX',
    'header:NAME^=PREFIX', or 'uri:/PREFIX'."""
    kind, sep, rest = text.partition(":")
    if sep and kind == "uri" and rest.startswith("/"):
        return {"uri": {"prefix": rest}}
    if sep and kind == "header":
        for operator, match_kind in (("~=", "regex"), ("^=", "prefix"), ("=", "exact")):
            name, found, value = rest.partition(operator)
            if found and name and "=" not in name and "~" not in name and "^" not in name:
                if not _HEADER_NAME.match(name):
                    raise RouteInputError(f"--match {text!r}: {name!r} is not a header name")
                if not value:
                    raise RouteInputError(f"--match {text!r}: the value is empty")
                return {"headers": {name.lower(): {match_kind: value}}}
    raise RouteInputError(
        f"--match {text!r}: write header:NAME=VALUE (exact), header:NAME^=PREFIX, "
        "header:NAME~=REGEX or uri:/PREFIX"
    )


def parse_duration(text: str, option: str) -> float:
    """'30s', '500ms', '2m', '1h' or plain seconds → seconds (> 0)."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", text)
    if not found:
        raise RouteInputError(f"{option} {text!r}: write a duration such as 30s, 500ms or 2m")
    value = float(found.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[found.group(2) or "s"]
    if value < 0.1:
        raise RouteInputError(f"{option} {text!r}: at least 100ms")
    return value


def parse_rate(text: str, option: str) -> float:
    """'1%' or '1' (percent) → 0.01."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*%?\s*", text)
    if not found:
        raise RouteInputError(f"{option} {text!r}: write a percentage such as 1% or 0.5%")
    percent = float(found.group(1))
    if percent > 100:
        raise RouteInputError(f"{option} {text!r}: at most 100%")
    return percent / 100


def check_version(version: str, option: str) -> None:
    if len(version) > 63 or not _LABEL.match(version):
        raise RouteInputError(
            f"{option}: version {version!r} is not a DNS label (lowercase letters, digits, '-')"
        )


def check_service(service: str, namespace: str) -> None:
    for what, value in (("SERVICE", service), ("--namespace", namespace)):
        if len(value) > 63 or not _LABEL.match(value):
            raise RouteInputError(
                f"{what} {value!r} is not a DNS label (lowercase letters, digits, '-')"
            )


def service_host(service: str, namespace: str) -> str:
    return f"{service}.{namespace}.{CLUSTER_DOMAIN}"


def _canonical(host: str, namespace: str) -> str:
    host = host.lower().rstrip(".")
    return f"{host}.{namespace}.{CLUSTER_DOMAIN}" if "." not in host else host


# ---------------------------------------------------------------------------------------------
# The resources that implement a split


@dataclass
class Routing:
    """A service's VirtualService and DestinationRule as stored (None: not there yet)."""

    service: str
    namespace: str
    virtual_service: dict[str, Any] | None = None
    destination_rule: dict[str, Any] | None = None

    @property
    def host(self) -> str:
        return service_host(self.service, self.namespace)

    def http_routes(self) -> list[dict[str, Any]]:
        return list((self.virtual_service or {}).get("spec", {}).get("http", []))

    def default_index(self) -> int | None:
        """The weighted default: the last http route without a match."""
        routes = self.http_routes()
        for index in range(len(routes) - 1, -1, -1):
            if not routes[index].get("match"):
                return index
        return None

    def default_weights(self) -> dict[str, int] | None:
        """{subset: weight} of the default route ('' = every instance); None if there is none."""
        index = self.default_index()
        if index is None:
            return None
        destinations = self.http_routes()[index].get("route") or []
        weights: dict[str, int] = {}
        for destination in destinations:
            subset = destination.get("destination", {}).get("subset") or ""
            weight = destination.get("weight")
            weights[subset] = weights.get(subset, 0) + (
                100 if weight is None and len(destinations) == 1 else weight or 0
            )
        return weights

    def subsets(self) -> dict[str, dict[str, str]]:
        spec = (self.destination_rule or {}).get("spec", {})
        return {s["name"]: dict(s.get("labels") or {}) for s in spec.get("subsets") or []}


def read_routing(client: Client, service: str, namespace: str) -> Routing:
    """The VirtualService and DestinationRule that route `service`'s host in `namespace`."""
    routing = Routing(service, namespace)
    host = routing.host
    for kind in ("VirtualService", "DestinationRule"):
        items = client.list(kind, namespace)["items"]
        if kind == "VirtualService":
            matching = [
                item
                for item in items
                if host in {_canonical(h, namespace) for h in item["spec"].get("hosts", [])}
            ]
        else:
            matching = [
                item
                for item in items
                if _canonical(item["spec"].get("host", ""), namespace) == host
            ]
        # The oldest wins in the compiler too; a resource named after the service is preferred.
        matching.sort(key=lambda item: (item["metadata"]["name"] != service,))
        chosen = matching[0] if matching else None
        if kind == "VirtualService":
            routing.virtual_service = chosen
        else:
            routing.destination_rule = chosen
    return routing


def _document(kind: str, namespace: str, existing: dict[str, Any] | None, name: str, spec: Any):
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if existing is not None:
        metadata["name"] = existing["metadata"]["name"]
        # Optimistic concurrency: the apply is refused if it changed since we read it.
        if "resourceVersion" in existing["metadata"]:
            metadata["resourceVersion"] = existing["metadata"]["resourceVersion"]
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": metadata, "spec": spec}


def _weighted(service: str, weights: Mapping[str, int]) -> list[dict[str, Any]]:
    if len(weights) == 1 and next(iter(weights.values())) == 100:
        subset = next(iter(weights))
        return [{"destination": {"host": service, **({"subset": subset} if subset else {})}}]
    return [
        {"destination": {"host": service, **({"subset": s} if s else {})}, "weight": w}
        for s, w in weights.items()
    ]


def plan(
    routing: Routing,
    weights: Mapping[str, int] | None = None,
    match: dict[str, Any] | None = None,
    to: str | None = None,
) -> list[dict[str, Any]]:
    """The DestinationRule and VirtualService documents that give `routing` these weights and/or
    this match rule; everything else in them (other rules, policies, timeouts) is kept."""
    service, namespace = routing.service, routing.namespace
    versions = [v for v in (weights or {}) if v] + ([to] if to else [])
    # DestinationRule: a subset per version named, labels version=V; existing subsets kept.
    rule = routing.destination_rule
    rule_spec = json.loads(json.dumps(rule["spec"])) if rule else {"host": service}
    subsets = list(rule_spec.get("subsets") or [])
    known = {s["name"] for s in subsets}
    for version in versions:
        if version not in known:
            subsets.append({"name": version, "labels": {"version": version}})
            known.add(version)
    rule_spec["subsets"] = subsets
    # VirtualService: the match rule just ahead of the default; the default's route replaced.
    virtual = routing.virtual_service
    if virtual is not None and len(virtual["spec"].get("hosts", [])) > 1:
        raise RouteInputError(
            f"VirtualService {namespace}/{virtual['metadata']['name']} routes several hosts "
            f"({', '.join(virtual['spec']['hosts'])}); route set changes only a VirtualService "
            f"for {service} alone: edit that one with meshctl apply"
        )
    vs_spec = json.loads(json.dumps(virtual["spec"])) if virtual else {"hosts": [service]}
    routes: list[dict[str, Any]] = list(vs_spec.get("http") or [])
    default = Routing(service, namespace, {"spec": {"http": routes}}).default_index()
    if default is None:
        routes.append({"route": _weighted(service, {"": 100})})
        default = len(routes) - 1
    if weights is not None:
        routes[default] = {**routes[default], "route": _weighted(service, weights)}
    if match is not None:
        assert to is not None
        rule_route = {"match": [match], "route": _weighted(service, {to: 100})}
        same = [i for i, r in enumerate(routes) if r.get("match") == [match]]
        if same:
            routes[same[0]] = {**routes[same[0]], "route": rule_route["route"]}
        else:
            routes.insert(default, rule_route)
    vs_spec["http"] = routes
    return [
        _document("DestinationRule", namespace, rule, service, rule_spec),
        _document("VirtualService", namespace, virtual, service, vs_spec),
    ]


def apply_plan(client: Client, documents: list[dict[str, Any]]) -> dict[str, int]:
    """Apply both documents atomically; {kind: new version}."""
    text = "\n---\n".join(json.dumps(document) for document in documents)
    answer = client.apply(text.encode())
    return {result["kind"]: result["version"] for result in answer["results"]}


def describe_weights(weights: Mapping[str, int]) -> str:
    return " ".join(f"{subset or 'any-version'}={weight}" for subset, weight in weights.items())


def describe_match(match: Mapping[str, Any]) -> str:
    parts = []
    for name, value in (match.get("headers") or {}).items():
        kind, text = next(iter(value.items()))
        operator = {"exact": "=", "prefix": "^=", "regex": "~="}.get(kind, f" {kind} ")
        parts.append(f"header {name}{operator}{text}")
    if match.get("uri"):
        kind, text = next(iter(match["uri"].items()))
        parts.append(f"uri {kind} {text}")
    if match.get("method"):
        kind, text = next(iter(match["method"].items()))
        parts.append(f"method {text}")
    return " and ".join(parts) or "(match)"


def describe_rules(routing: Routing) -> list[str]:
    lines = []
    routes = routing.http_routes()
    default = routing.default_index()
    for position, route in enumerate(routes, 1):
        targets = {}
        for destination in route.get("route") or []:
            subset = destination.get("destination", {}).get("subset") or ""
            weight = destination.get("weight")
            targets[subset] = 100 if weight is None and len(route["route"]) == 1 else weight or 0
        action = (
            describe_weights(targets) if targets else ("redirect" if route.get("redirect") else "?")
        )
        if route.get("match"):
            when = " or ".join(describe_match(m) for m in route["match"])
        else:
            when = "default" if position - 1 == default else "every request"
        lines.append(f"  {position}. {when:<32} → {action}")
    return lines


# ---------------------------------------------------------------------------------------------
# The live split, from the sidecars' own counters


@dataclass
class VersionCount:
    """One destination's figures: counters (or their growth over a window) and gauges."""

    requests: int = 0  # requests answered, once each however many tries they took
    errors: int = 0  # of those, answered 5xx (the upstream's after retries, or a local reply)
    tries: int = 0  # requests sent upstream, retries included (Envoy's upstream_rq_total)
    retries: int = 0
    retry_successes: int = 0  # retries whose answer needed no further retry
    overflows: int = 0  # refused by a circuit breaker: pending, active, connection or retry
    ejected: int = 0  # endpoints outlier detection holds out now (a gauge: the highest caller's)
    fallbacks: int = 0  # answers given by a Fallback instead of this destination

    def growth_since(self, old: VersionCount) -> VersionCount:
        """The counters' growth since `old` (the gauge as it is now); a counter that went down
        means the sidecar restarted, so all of it is new."""
        counters = ("requests", "errors", "tries", "retries", "retry_successes", "overflows",
                    "fallbacks")  # fmt: skip
        if any(getattr(self, name) < getattr(old, name) for name in counters):
            old = VersionCount()
        grown = {name: getattr(self, name) - getattr(old, name) for name in counters}
        return VersionCount(**grown, ejected=self.ejected)

    def add(self, other: VersionCount) -> None:
        """Sum another sidecar's figures in; ejections are each caller's own view of the same
        endpoints, so the highest is kept rather than a sum."""
        for name in ("requests", "errors", "tries", "retries", "retry_successes", "overflows",
                     "fallbacks"):  # fmt: skip
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.ejected = max(self.ejected, other.ejected)

    @property
    def failures(self) -> int:
        """What users saw fail: 5xx answers, and fallback answers (a degraded answer is a failure
        of the version it replaced). A fallback may stand in for a request whose cluster also
        counted a 5xx; counting both errs towards rolling back, never towards going on."""
        return self.errors + self.fallbacks

    @property
    def answered(self) -> int:
        """Requests users got an answer for, from the destination or from its fallback (at
        least its failures, for the same reason: a rate never above 100%)."""
        return max(self.requests, self.failures)


# Per-cluster series read for the live split, and the VersionCount field each adds to.
_CLUSTER_COUNTERS = {
    "meshctl_upstream_rq_total": "tries",
    "meshctl_upstream_rq_retry_total": "retries",
    "meshctl_upstream_rq_retry_success_total": "retry_successes",
    "meshctl_upstream_rq_pending_overflow_total": "overflows",
    "meshctl_upstream_rq_active_overflow_total": "overflows",
    "meshctl_upstream_cx_overflow_total": "overflows",
    "meshctl_upstream_rq_retry_overflow_total": "overflows",
    "meshctl_outlier_detection_ejections_active": "ejected",
    # Requests for this cluster its Fallback answered (meshctl_fallback_total has the same by host).
    "meshctl_upstream_rq_fallback_total": "fallbacks",
}


@dataclass
class Scrape:
    """One read of every reachable sidecar: {node id: {cluster: VersionCount}}."""

    at: float
    counters: dict[str, dict[str, VersionCount]] = field(default_factory=dict)
    unreachable: dict[str, str] = field(default_factory=dict)  # node id → why


def parse_prometheus(text: str) -> dict[str, VersionCount]:
    """Outbound figures by cluster from /stats/prometheus."""
    counts: dict[str, VersionCount] = {}
    for metric, labels, number in samples(text):
        if metric not in _CLUSTER_COUNTERS and metric != "meshctl_upstream_rs_total":
            continue
        value = int(number)
        cluster = labels.get("cluster", "")
        if not cluster.startswith("outbound|"):
            continue
        count = counts.setdefault(cluster, VersionCount())
        if metric == "meshctl_upstream_rs_total":
            # The engine records one response per request (a retried try's is discarded), so
            # these are the outcomes the calling app saw, unlike upstream_rq_total (per try).
            count.requests += value
            if labels.get("code_class") == "5xx":
                count.errors += value
        else:
            name = _CLUSTER_COUNTERS[metric]
            setattr(count, name, getattr(count, name) + value)
    return counts


def scrape(sidecars: Iterable[Mapping[str, Any]]) -> Scrape:
    """Read every registered sidecar's counters that this machine can reach, concurrently."""
    reads = read_sidecars(sidecars, parse_prometheus)
    return Scrape(reads.at, reads.by_node, reads.unreachable)


def split_between(before: Scrape, after: Scrape, host: str) -> dict[str, VersionCount]:
    """Figures per subset of `host` ('' = no subset) between two scrapes, summed over the
    sidecars read both times."""
    split: dict[str, VersionCount] = {}
    for node, clusters in after.counters.items():
        earlier = before.counters.get(node)
        if earlier is None:
            continue
        for cluster, count in clusters.items():
            _, _, subset, cluster_host = cluster.split("|", 3)
            if cluster_host != host:
                continue
            grown = count.growth_since(earlier.get(cluster, VersionCount()))
            split.setdefault(subset, VersionCount()).add(grown)
    return split


def format_split(
    split: Mapping[str, VersionCount], seconds: float, bars: bool = False
) -> list[str]:
    total = sum(count.requests for count in split.values())
    if total == 0 and not any(c.fallbacks or c.ejected for c in split.values()):
        return [f"  no requests in the last {seconds:.1f}s"]
    lines = [
        f"  {'VERSION':<12}{'REQUESTS':>9}{'SHARE':>8}{'5XX':>8}{'RPS':>8}"
        f"{'RETRIES':>9}{'(OK)':>7}{'EJECTED':>9}{'OVERFLOW':>10}{'FALLBACKS':>11}"
    ]
    for subset in sorted(split):
        count = split[subset]
        if not (count.requests or count.fallbacks or count.ejected or count.retries or bars):
            continue
        share = count.requests / total if total else 0.0
        error_rate = count.errors / count.requests if count.requests else 0.0
        name = subset or "any-version"
        line = (
            f"  {name:<12}{count.requests:>9}{share:>8.1%}"
            f"{error_rate:>8.1%}{count.requests / seconds:>8.1f}"
            f"{count.retries:>9}{count.retry_successes:>7}{count.ejected:>9}"
            f"{count.overflows:>10}{count.fallbacks:>11}"
        )
        if bars:
            line += "  " + "█" * round(share * 40)
        lines.append(line)
    return lines


def live_split(
    client: Client, host: str, window: float
) -> tuple[dict[str, VersionCount], Scrape, float]:
    sidecars = client.sidecars()["items"]
    first = scrape(sidecars)
    time.sleep(window)
    second = scrape(sidecars)
    return split_between(first, second, host), second, second.at - first.at


# ---------------------------------------------------------------------------------------------
# The commands


def _refuse(command: str, message: str) -> NoReturn:
    typer.echo(f"meshctl route {command}: {message}", err=True)
    raise typer.Exit(INVALID_INPUT)


ServiceArgument = Annotated[str, typer.Argument(help="The service, as registered (--service).")]


@route_app.command("set")
def route_set(
    service: ServiceArgument,
    weights: Annotated[
        str | None,
        typer.Option(
            help="The default split by version, whole percents summing to 100: v1=90,v2=10."
        ),
    ] = None,
    match: Annotated[
        str | None,
        typer.Option(
            help="A rule ahead of the default: header:NAME=VALUE (exact), header:NAME^=PREFIX, "
            "header:NAME~=REGEX or uri:/PREFIX. Needs --to."
        ),
    ] = None,
    to: Annotated[
        str | None, typer.Option(help="The version requests matching --match go to.")
    ] = None,
    namespace: NamespaceOption = "default",
    control_plane: ControlPlaneOption = None,
    token: TokenOption = None,
    client_cert: ClientCertOption = None,
    client_key: ClientKeyOption = None,
    ca_root: CaRootOption = None,
) -> None:
    """Create or update the VirtualService and DestinationRule that route SERVICE by version.

    --weights replaces the default split and keeps header rules; --match/--to adds (or
    updates) a rule just ahead of the default and keeps the weights. Subsets are named by version
    and select labels version=VERSION. Both resources are applied at once, against the versions
    read: exit 3 if someone changed them in between, 2 for bad input, 1 otherwise.
    """
    from meshctl.control.client import ClientError

    try:
        check_service(service, namespace)
        if weights is None and match is None:
            raise RouteInputError(
                "give --weights v1=90,v2=10, or --match header:NAME=VALUE --to VERSION"
            )
        if (match is None) != (to is None):
            raise RouteInputError("--match and --to go together")
        parsed_weights = parse_weights(weights) if weights is not None else None
        parsed_match = parse_match(match) if match is not None else None
        if to is not None:
            check_version(to, "--to")
    except RouteInputError as error:
        _refuse("set", str(error))
    client = connect(control_plane, token, "route set", client_cert, client_key, ca_root)
    try:
        routing = read_routing(client, service, namespace)
        documents = plan(routing, parsed_weights, parsed_match, to)
        versions = apply_plan(client, documents)
        registered = client.sidecars()["items"]
    except RouteInputError as error:
        _refuse("set", str(error))
    except ClientError as error:
        fail("route set", error)
    applied = Routing(service, namespace, documents[1], documents[0])
    typer.echo(
        f"{service}.{namespace}: VirtualService {documents[1]['metadata']['name']} (version "
        f"{versions.get('VirtualService')}), DestinationRule {documents[0]['metadata']['name']} "
        f"(version {versions.get('DestinationRule')})"
    )
    for line in describe_rules(applied):
        typer.echo(line)
    _warn_missing_versions(service, namespace, applied, registered, "set")


def _warn_missing_versions(
    service: str, namespace: str, routing: Routing, registered: list[dict[str, Any]], command: str
) -> None:
    ready = {
        s.get("version")
        for s in registered
        if s["service"] == service and s["namespace"] == namespace and s.get("ready")
    }
    wanted = {
        d.get("destination", {}).get("subset")
        for r in routing.http_routes()
        for d in r.get("route") or []
        if d.get("weight", 100)
    } - {None, ""}
    missing = sorted(
        v for v in wanted if routing.subsets().get(v, {}).get("version", v) not in ready
    )
    if missing:
        typer.echo(
            f"meshctl route {command}: note: no ready instance of {service} has version "
            f"{', '.join(missing)} yet; requests routed there answer 503 until one does",
            err=True,
        )


@route_app.command("show")
def route_show(
    service: ServiceArgument,
    window: Annotated[
        str, typer.Option(help="How long to watch the sidecars' counters for the live split.")
    ] = "2s",
    live: Annotated[bool, typer.Option(help="Read the live split from the sidecars.")] = True,
    output: Annotated[str, typer.Option("--output", "-o", help="text or json.")] = "text",
    namespace: NamespaceOption = "default",
    control_plane: ControlPlaneOption = None,
    token: TokenOption = None,
    client_cert: ClientCertOption = None,
    client_key: ClientKeyOption = None,
    ca_root: CaRootOption = None,
) -> None:
    """SERVICE's rules, its instances, and the live split by version.

    The rules are listed first match first. The live split is each
    version's share of the requests the sidecars sent it during --window, its 5xx rate (per
    request, as the callers saw it), its retries (and how many of them succeeded), its endpoints
    ejected by outlier detection now, its requests refused by circuit breakers (overflow) and the
    answers a Fallback gave instead ("(host)" when the Fallback counts them for the whole host)."""
    from meshctl.control.client import ClientError

    try:
        check_service(service, namespace)
        seconds = parse_duration(window, "--window")
        if output not in ("text", "json"):
            raise RouteInputError(f"--output {output!r}: choose text or json")
    except RouteInputError as error:
        _refuse("show", str(error))
    client = connect(control_plane, token, "route show", client_cert, client_key, ca_root)
    try:
        routing = read_routing(client, service, namespace)
        split, last, measured = (
            live_split(client, routing.host, seconds) if live else ({}, None, 0.0)
        )
        registered = client.sidecars()["items"]
    except ClientError as error:
        fail("route show", error)
    instances: dict[str, list[bool]] = {}
    for sidecar in registered:
        if (
            sidecar["service"] == service
            and sidecar["namespace"] == namespace
            and sidecar.get("appPort")
        ):
            instances.setdefault(sidecar.get("version") or "", []).append(
                bool(sidecar.get("ready"))
            )
    if output == "json":
        typer.echo(
            json.dumps(
                {
                    "service": service,
                    "namespace": namespace,
                    "virtualService": routing.virtual_service,
                    "destinationRule": routing.destination_rule,
                    "defaultWeights": routing.default_weights(),
                    "instances": {
                        v: {"ready": sum(r), "total": len(r)} for v, r in instances.items()
                    },
                    "live": None
                    if last is None
                    else {
                        "seconds": measured,
                        "sidecarsRead": len(last.counters),
                        "unreachable": last.unreachable,
                        "versions": {
                            s: {
                                "requests": c.requests,
                                "errors5xx": c.errors,
                                "tries": c.tries,
                                "retries": c.retries,
                                "retrySuccesses": c.retry_successes,
                                "ejectedEndpoints": c.ejected,
                                "overflows": c.overflows,
                                "fallbacks": c.fallbacks,
                            }
                            for s, c in split.items()
                            if c.requests or c.retries or c.ejected or c.fallbacks
                        },
                    },
                },
                indent=2,
            )
        )
        return
    if routing.virtual_service is None:
        typer.echo(f"{service}.{namespace}: no VirtualService: every instance gets an even share")
    else:
        meta = routing.virtual_service["metadata"]
        typer.echo(
            f"{service}.{namespace}: VirtualService {meta['name']} (version {meta['resourceVersion']}); "
            "rules, first match wins:"
        )
        for line in describe_rules(routing):
            typer.echo(line)
    subsets = routing.subsets()
    if subsets:
        typer.echo(
            "subsets: "
            + ", ".join(
                f"{name} ({','.join(f'{k}={v}' for k, v in labels.items())})"
                for name, labels in subsets.items()
            )
        )
    typer.echo(
        "instances: "
        + (
            ", ".join(
                f"{version or 'no version'} {sum(ready)}/{len(ready)} ready"
                for version, ready in sorted(instances.items())
            )
            or "none registered"
        )
    )
    if last is None:
        return
    read_from = f"{len(last.counters)} sidecar{'s' if len(last.counters) != 1 else ''}"
    typer.echo(f"live split over {measured:.1f}s (counters of {read_from}; header rules included):")
    for line in format_split(split, measured):
        typer.echo(line)
    if last.unreachable:
        node, why = next(iter(last.unreachable.items()))
        typer.echo(f"  not read: {len(last.unreachable)} sidecar(s), e.g. {node}: {why}", err=True)


@dataclass
class ShiftOutcome:
    completed: bool
    weights: dict[str, int]
    message: str


def run_shift(
    client: Client,
    service: str,
    namespace: str,
    source: str,
    target: str,
    step: int,
    interval: float,
    max_error_rate: float,
    say: Callable[[str], None],
    sleep: Callable[[float], None] = time.sleep,
    min_requests: int = 20,
) -> ShiftOutcome:
    """Move `step` points of the default route from `source` to `target` every `interval`, after
    checking that `target`'s failure share of its requests in the last interval is within the
    limit; past it, put every request back on `source`. Failures are what users saw: a request
    retried to success is a success, a 5xx after retries or a Fallback's answer a failure. A
    check waits for `min_requests` to reach `target` (up to MAX_WATCH_INTERVALS intervals). Raises ClientError and RouteInputError."""
    routing = read_routing(client, service, namespace)
    current = routing.default_weights()
    if current is None or routing.virtual_service is None:
        current = {source: 100}
    others = {v: w for v, w in current.items() if v not in (source, target) and w}
    if others:
        raise RouteInputError(
            f"the default route of {service} also sends traffic to {describe_weights(others)}; "
            f"set it to {source} and {target} only first (meshctl route set {service} "
            f"--weights {source}=100)"
        )
    if not ready_instances(client, routing, target):
        raise RouteInputError(
            f"no ready instance of {service} matches subset {target} "
            f"({_selector_text(routing, target)}): nothing to shift to"
        )
    weight = current.get(target, 0)
    host = routing.host
    limit = f"{max_error_rate:.2%}"
    say(
        f"shift {service}.{namespace}: {source} → {target} by {step}% every {interval:g}s; "
        f"rollback above {limit} failed requests on {target} (now {source}={100 - weight} "
        f"{target}={weight})"
    )
    def roll_back(why: str) -> ShiftOutcome:
        """Put every request back on `source`, and say why."""
        rollback = {source: 100, target: 0}
        _apply_fresh(client, service, namespace, rollback)
        message = f"rolled back: {why}; {service} is {describe_weights(rollback)}"
        say(message)
        return ShiftOutcome(False, rollback, message)

    total_steps = -(-(100 - weight) // step)
    number = 0
    # The VirtualService as we last wrote it: a change by anyone else stops the shift.
    ours = _version_of(routing.virtual_service)
    while True:
        if weight > 0:
            # Watch the target at its present share before giving it more (and once at 100%).
            sidecars = client.sidecars()["items"]
            before = scrape(sidecars)
            for waited in range(1, MAX_WATCH_INTERVALS + 1):
                sleep(interval)
                after = scrape(sidecars)
                count = split_between(before, after, host).get(target, VersionCount())
                if count.answered >= min_requests or waited == MAX_WATCH_INTERVALS:
                    break
                # Too few requests to judge: watch on (a few errors in 3 requests prove little).
                say(f"  {target}: {count.answered} requests so far, watching for {min_requests}")
            # A subset with no instance answers 503 in the caller's sidecar without counting a
            # request to its cluster, so the registry is asked too.
            gone = not ready_instances(client, routing, target)
            if gone or count.answered == 0:
                if gone:
                    return roll_back(f"{target} has no ready instance left")
                say(
                    f"  {target}: no requests in {after.at - before.at:.1f}s; error rate unknown, "
                    "going on"
                )
            else:
                rate = count.failures / count.answered
                verdict = (
                    f"  {target}: {count.answered} requests, {count.failures} failed ({rate:.2%}; "
                    f"{count.errors} 5xx, {count.fallbacks} fallbacks, {count.retries} retries of "
                    f"which {count.retry_successes} succeeded) in {after.at - before.at:.1f}s"
                )
                if rate > max_error_rate:
                    say(verdict + f" > {limit}")
                    return roll_back(f"{target}'s failure rate {rate:.2%} crossed {limit}")
                say(verdict + " ok")
        if weight >= 100:
            message = f"done: {service} is {target}=100"
            say(message)
            return ShiftOutcome(True, {source: 0, target: 100}, message)
        routing = read_routing(client, service, namespace)
        if _version_of(routing.virtual_service) != ours:
            from meshctl.control.client import ClientError

            raise ClientError(
                f"the route of {service} changed during the shift (not by this command); "
                f"stopped; the last weights it set were {source}={100 - weight} {target}={weight}",
                3,
            )
        weight = min(100, weight + step)
        number += 1
        weights = {source: 100 - weight, target: weight}
        versions = apply_plan(client, plan(routing, weights))
        ours = str(versions.get("VirtualService"))
        say(f"step {number}/{total_steps}: {describe_weights(weights)}")


def _subset_selector(routing: Routing, version: str) -> dict[str, str]:
    return routing.subsets().get(version) or {"version": version}


def _selector_text(routing: Routing, version: str) -> str:
    return ",".join(f"{k}={v}" for k, v in _subset_selector(routing, version).items())


def ready_instances(client: Client, routing: Routing, version: str) -> int:
    """How many ready registered instances of the service the subset `version` selects."""
    selector = _subset_selector(routing, version)
    count = 0
    for sidecar in client.sidecars()["items"]:
        if sidecar["service"] != routing.service or sidecar["namespace"] != routing.namespace:
            continue
        labels = {"app": sidecar["service"], "version": sidecar.get("version") or ""}
        labels.update(sidecar.get("labels") or {})
        if sidecar.get("ready") and all(labels.get(k) == v for k, v in selector.items()):
            count += 1
    return count


def _version_of(resource: dict[str, Any] | None) -> str | None:
    return None if resource is None else str(resource["metadata"]["resourceVersion"])


def _apply_fresh(client: Client, service: str, namespace: str, weights: dict[str, int]) -> None:
    """Apply against freshly read versions, retrying a lost race a few times (rollback)."""
    from meshctl.control.client import ClientError

    for attempt in range(3):
        try:
            apply_plan(client, plan(read_routing(client, service, namespace), weights))
            return
        except ClientError as error:
            if error.exit_code != 3 or attempt == 2:
                raise


@route_app.command("shift")
def route_shift(
    service: ServiceArgument,
    source: Annotated[str, typer.Option("--from", help="The version traffic moves away from.")],
    target: Annotated[str, typer.Option("--to", help="The new version traffic moves to.")],
    step: Annotated[int, typer.Option(help="Percentage points moved at each step (1-100).")] = 10,
    interval: Annotated[
        str, typer.Option(help="Time between steps, watched for errors: 30s, 500ms, 2m.")
    ] = "30s",
    max_error_rate: Annotated[
        str,
        typer.Option(
            help="Roll back when the share of --to's requests that failed in an interval (5xx "
            "after retries, or a Fallback's answer) is above this."
        ),
    ] = "1%",
    min_requests: Annotated[
        int,
        typer.Option(
            min=1,
            help="Requests --to must get before its error rate is judged; a check watches up to "
            f"{MAX_WATCH_INTERVALS} intervals for them.",
        ),
    ] = 20,
    namespace: NamespaceOption = "default",
    control_plane: ControlPlaneOption = None,
    token: TokenOption = None,
    client_cert: ClientCertOption = None,
    client_key: ClientKeyOption = None,
    ca_root: CaRootOption = None,
) -> None:
    """A progressive canary that rolls itself back on errors.

    Moves SERVICE's default route from --from to --to, --step points
    every --interval. Before each step, and for one interval at 100%, --to's failure rate as
    its callers saw it (from the sidecars' counters: a request retried to success counts as a
    success, a 5xx after retries or a Fallback's answer as a failure) is checked; above
    --max-error-rate, every request goes back to --from.

    Exit codes: 0 all traffic on --to; 5 rolled back; 2 bad input; 3 someone else changed the
    route meanwhile (the shift stops there); 130 interrupted (weights left where they were);
    1 anything else.
    """
    from meshctl.control.client import ClientError

    try:
        check_service(service, namespace)
        check_version(source, "--from")
        check_version(target, "--to")
        if source == target:
            raise RouteInputError("--from and --to are the same version")
        if not 1 <= step <= 100:
            raise RouteInputError(f"--step {step}: choose 1 to 100 percentage points")
        seconds = parse_duration(interval, "--interval")
        limit = parse_rate(max_error_rate, "--max-error-rate")
    except RouteInputError as error:
        _refuse("shift", str(error))
    client = connect(control_plane, token, "route shift", client_cert, client_key, ca_root)

    def say(line: str) -> None:
        typer.echo(line)
        sys.stdout.flush()

    try:
        outcome = run_shift(
            client, service, namespace, source, target, step, seconds, limit, say,
            min_requests=min_requests,
        )  # fmt: skip
    except RouteInputError as error:
        _refuse("shift", str(error))
    except ClientError as error:
        fail("route shift", error)
    except KeyboardInterrupt:
        typer.echo("meshctl route shift: interrupted; the weights stay as last applied", err=True)
        raise typer.Exit(INTERRUPTED) from None
    if not outcome.completed:
        raise typer.Exit(ROLLED_BACK)
