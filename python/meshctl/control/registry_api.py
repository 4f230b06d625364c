"""The registry's REST endpoints, beside the resource API: sidecars register, renew and leave.

    PUT    /v1/sidecars/{node_id}   register or renew (JSON body, see registry.parse_registration)
    DELETE /v1/sidecars/{node_id}   leave now (the agent's clean exit)
    GET    /v1/sidecars             every live registration, and where the xDS server listens

The answer to a PUT carries `xds` (HOST:PORT of the ADS server), so an agent needs only the
API's address.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from meshctl.control.api_handlers import ApiError, Request
from meshctl.control.ratelimit_local_counts import CountsError, parse_counts
from meshctl.control.registry import RegistrationError, Registry, Sidecar, parse_registration


class RegistryApi:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def handles(self, parts: list[str]) -> bool:
        return parts[:2] == ["v1", "sidecars"]

    async def handle(self, request: Request, parts: list[str]) -> tuple[int, dict[str, Any]]:
        if len(parts) == 2:
            _allow(request, "GET")
            return 200, {
                "xds": self.registry.xds_address,
                "items": [sidecar.as_json() for sidecar in self.registry.sidecars()],
            }
        if len(parts) != 3:
            raise ApiError("not_found", f"no such endpoint {request.path}")
        node_id = parts[2]
        if request.method == "PUT":
            return 200, await register(self.registry, node_id, request.body)
        if request.method == "DELETE":
            return 200, await deregister(self.registry, node_id)
        _allow(request, "PUT")
        raise AssertionError("unreachable")


async def register(
    registry: Registry, node_id: str, body: bytes, identity: str | None = None,
    check: Callable[[Sidecar], None] | None = None,
) -> dict[str, Any]:
    """Register or renew (REST PUT, and the Register gRPC method on the xDS port). `identity` is
    the SPIFFE ID the caller proved (None: registered with the API token); `check` may refuse
    the parsed registration (raise ApiError). A body's `rateLimitCounts` (the sidecar's cumulative
    local rate limit counts) join the registry's samples, not the registration: they change with
    every renewal and must not recompile anyone's config."""
    try:
        sidecar = parse_registration(node_id, body)
        reported = json.loads(body).get("rateLimitCounts") if b'"rateLimitCounts"' in body else None
        counts = parse_counts(reported) if reported is not None else None
    except (RegistrationError, CountsError) as error:
        raise ApiError("invalid", f"sidecar {node_id}: {error}") from None
    if check is not None:
        check(sidecar)
    if identity is not None:
        sidecar = replace(sidecar, identity=identity)
    changed = await registry.put(sidecar)
    if counts is not None:
        # The registry's clock, so that the samples go when the lease does and age with it.
        registry.rate_limit_counts.record(node_id, counts, registry.now())
    return {"sidecar": sidecar.as_json(), "changed": changed, "xds": registry.xds_address}


async def deregister(registry: Registry, node_id: str) -> dict[str, Any]:
    if not await registry.remove(node_id):
        raise ApiError("not_found", f"sidecar {node_id} is not registered")
    return {"deregistered": node_id}


def _allow(request: Request, method: str) -> None:
    if request.method != method:
        raise ApiError(
            "method_not_allowed", f"{request.method} is not allowed on {request.path}; use {method}"
        )
