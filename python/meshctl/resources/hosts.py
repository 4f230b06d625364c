"""Host names as Istio resolves them, so resources written with short names find each other."""

from __future__ import annotations

CLUSTER_DOMAIN = "svc.cluster.local"


def canonical_host(host: str, namespace: str) -> str:
    """A short name ("reviews") means the service in the resource's own namespace, as in Istio."""
    host = host.lower().rstrip(".")
    if "." not in host and host != "*":
        return f"{host}.{namespace}.{CLUSTER_DOMAIN}"
    return host


def host_matches(pattern: str, host: str) -> bool:
    """Whether a canonical `host` is covered by a canonical `pattern`, which may be '*.suffix'."""
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return pattern == host
