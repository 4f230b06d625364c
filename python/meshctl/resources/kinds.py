"""The resource kinds this mesh knows, their API versions and the names the CLI accepts for them."""

from __future__ import annotations

from dataclasses import dataclass

from meshctl.resources.authorization_policy import AuthorizationPolicySpec
from meshctl.resources.common import MeshModel
from meshctl.resources.destination_rule import DestinationRuleSpec
from meshctl.resources.fallback import FallbackSpec
from meshctl.resources.peer_authentication import PeerAuthenticationSpec
from meshctl.resources.rate_limit import RateLimitSpec
from meshctl.resources.service_entry import ServiceEntrySpec, WorkloadEntrySpec
from meshctl.resources.telemetry import TelemetrySpec
from meshctl.resources.virtual_service import VirtualServiceSpec

GROUP = "networking.istio.io"
SECURITY_GROUP = "security.istio.io"
TELEMETRY_GROUP = "telemetry.istio.io"
# meshctl's own kinds: what no mesh has, kept out of Istio's groups so Istio's YAML stays Istio's.
POLICY_GROUP = "policy.meshctl.io"
# Istio serves the same schema under each of a group's versions; files written for any apply unchanged.
_VERSIONS = {
    GROUP: ("v1", "v1beta1", "v1alpha3"),
    SECURITY_GROUP: ("v1", "v1beta1"),
    TELEMETRY_GROUP: ("v1", "v1alpha1"),
    POLICY_GROUP: ("v1alpha1",),
}
API_VERSIONS = tuple(f"{GROUP}/{version}" for version in _VERSIONS[GROUP])


@dataclass(frozen=True)
class KindInfo:
    kind: str
    plural: str
    short: str
    spec: type[MeshModel]
    group: str = GROUP

    @property
    def api_versions(self) -> tuple[str, ...]:
        return tuple(f"{self.group}/{version}" for version in _VERSIONS[self.group])


KINDS: dict[str, KindInfo] = {
    info.kind: info
    for info in (
        KindInfo("VirtualService", "virtualservices", "vs", VirtualServiceSpec),
        KindInfo("DestinationRule", "destinationrules", "dr", DestinationRuleSpec),
        KindInfo("ServiceEntry", "serviceentries", "se", ServiceEntrySpec),
        KindInfo("WorkloadEntry", "workloadentries", "we", WorkloadEntrySpec),
        KindInfo("PeerAuthentication", "peerauthentications", "pa", PeerAuthenticationSpec, SECURITY_GROUP),
        KindInfo(
            "AuthorizationPolicy", "authorizationpolicies", "ap", AuthorizationPolicySpec, SECURITY_GROUP
        ),
        KindInfo("Telemetry", "telemetries", "telemetry", TelemetrySpec, TELEMETRY_GROUP),
        KindInfo("Fallback", "fallbacks", "fb", FallbackSpec, POLICY_GROUP),
        KindInfo("RateLimit", "ratelimits", "rl", RateLimitSpec, POLICY_GROUP),
    )
}

# Istio kinds that later issues bring; naming them gives a better error than "unknown kind".
LATER_KINDS = {
    "RequestAuthentication": "request authentication is not supported yet",
    "Gateway": "gateways are not supported yet; routes apply to sidecars only",
    "Sidecar": "the Sidecar resource is not supported yet",
    "EnvoyFilter": "EnvoyFilter is not supported; use the plugin API instead",
    "WorkloadGroup": "WorkloadGroup is not supported yet",
    "ProxyConfig": "ProxyConfig is not supported yet",
}

_BY_NAME: dict[str, KindInfo] = {}
for _info in KINDS.values():
    for _name in (_info.kind, _info.plural, _info.short):
        _BY_NAME[_name.lower()] = _info


class UnknownKind(ValueError):
    pass


def resolve_kind(name: str) -> KindInfo:
    """'vs', 'virtualservice', 'VirtualServices' ... -> the VirtualService kind."""
    info = _BY_NAME.get(name.lower())
    if info is None:
        known = ", ".join(f"{info.kind} ({info.short})" for info in KINDS.values())
        raise UnknownKind(f"unknown kind {name!r}; known kinds: {known}")
    return info
