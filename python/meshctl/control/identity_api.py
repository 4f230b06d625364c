"""The identity endpoints of the REST API (API token), behind `meshctl identity ...`:

POST   /v1/identity/tokens                {"serviceAccount", "namespace", "ttlSeconds"} → the token
GET    /v1/identity/tokens                every join token (never a secret)
DELETE /v1/identity/tokens/{id}           revoke a join token
GET    /v1/identity/certificates          issued certificates: SPIFFE ID, serial, expiry, revoked
POST   /v1/identity/revocations           {"serial"} or {"serviceAccount", "namespace"}
GET    /v1/identity/roots                 the trust bundle's roots
POST   /v1/identity/roots/rotate          {"overlapSeconds"}: a new root signs from now on
POST   /v1/identity/roots/finish          stop trusting the previous root
POST   /v1/identity/operator-certificates {"name", "csr", "ttlSeconds"}: sign the CSR (its one URI
                                          SAN spiffe://TD/ns/meshctl-system/sa/NAME) as a
                                          workload's → {"certChain", "serial", "spiffeId",
                                          "notAfter", "roots"}
"""

from __future__ import annotations

import json
from typing import Any

from meshctl.control.api_handlers import ApiError, Request
from meshctl.control.api_tls import operator_identity
from meshctl.control.identity_authority import IdentityAuthority, IdentityError
from meshctl.identity.ca import DEFAULT_OVERLAP, CsrError, load_csr
from meshctl.identity.spiffe import SpiffeIdError


class IdentityApi:
    def __init__(self, authority: IdentityAuthority) -> None:
        self.authority = authority

    def handles(self, parts: list[str]) -> bool:
        return parts[:2] == ["v1", "identity"]

    async def handle(self, request: Request, parts: list[str]) -> tuple[int, dict[str, Any]]:
        try:
            return 200, await self._route(request, parts[2:])
        except IdentityError as error:
            raise ApiError(error.code, error.message) from None
        except SpiffeIdError as error:
            raise ApiError("invalid", str(error)) from None
        except CsrError as error:  # a malformed CSR, or one naming another identity
            raise ApiError("invalid", str(error)) from None

    async def _route(self, request: Request, parts: list[str]) -> dict[str, Any]:
        authority = self.authority
        if parts == ["tokens"]:
            if request.method == "POST":
                body = _body(request)
                text, record = await authority.create_token(
                    _string(body, "serviceAccount"), _string(body, "namespace", "default"),
                    _number(body, "ttlSeconds", 3600.0),
                )  # fmt: skip
                return {"token": text, **record.public_json()}
            _allow(request, "GET")
            return {"items": [token.public_json() for token in await authority.list_tokens()]}
        if len(parts) == 2 and parts[0] == "tokens":
            _allow(request, "DELETE")
            return (await authority.revoke_token(parts[1])).public_json()
        if parts == ["certificates"]:
            _allow(request, "GET")
            return {"items": [_certificate_json(r) for r in await authority.list_certificates()]}
        if parts == ["revocations"]:
            _allow(request, "POST")
            body = _body(request)
            if "serial" in body:
                revoked = await authority.revoke_serial(_string(body, "serial"))
            elif "serviceAccount" in body:
                revoked = await authority.revoke_service_account(
                    _string(body, "serviceAccount"), _string(body, "namespace", "default")
                )
            else:
                raise ApiError("invalid", "give serial, or serviceAccount (and namespace)")
            return {"revoked": [_certificate_json(r) for r in revoked]}
        if parts == ["roots"]:
            _allow(request, "GET")
            return authority.roots_json()
        if parts == ["roots", "rotate"]:
            _allow(request, "POST")
            await authority.rotate(_number(_body(request), "overlapSeconds", DEFAULT_OVERLAP))
            return authority.roots_json()
        if parts == ["operator-certificates"]:
            _allow(request, "POST")
            return await self._operator_certificate(_body(request))
        if parts == ["roots", "finish"]:
            _allow(request, "POST")
            await authority.finish_rotation()
            return authority.roots_json()
        raise ApiError("not_found", f"no such endpoint {request.path}")

    async def _operator_certificate(self, body: dict[str, Any]) -> dict[str, Any]:
        """An operator's certificate, signed exactly as a workload's (same checks, lifetime
        bounds and record, so `identity list` shows it and `identity revoke` revokes it)."""
        authority = self.authority
        identity = operator_identity(authority.ca.trust_domain, _string(body, "name"))
        csr = load_csr(_string(body, "csr"))
        ttl = _number(body, "ttlSeconds", authority.settings.default_ttl)
        issued = await authority.issue(csr, identity, ttl, node=None)
        return {
            "certChain": issued.chain_pem, "serial": issued.serial_hex, "spiffeId": issued.spiffe_id,
            "notAfter": issued.not_after, "roots": authority.bundle_pem(),
        }  # fmt: skip


def _certificate_json(record: dict[str, Any]) -> dict[str, Any]:
    return {
        "serial": record.get("serial"), "spiffeId": record.get("spiffeId"),
        "notAfter": record.get("notAfter"), "node": record.get("node"),
        "revoked": bool(record.get("revoked")), "revokedAt": record.get("revokedAt"),
    }  # fmt: skip


def _body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(request.body or b"{}")
    except ValueError as error:
        raise ApiError("bad_request", f"the body is not JSON: {error}") from None
    if not isinstance(body, dict):
        raise ApiError("bad_request", "the body must be a JSON object")
    return body


def _string(body: dict[str, Any], name: str, default: str | None = None) -> str:
    value = body.get(name, default)
    if not isinstance(value, str) or not value:
        raise ApiError("invalid", f"{name}: required (a non-empty string)")
    return value


def _number(body: dict[str, Any], name: str, default: float) -> float:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ApiError("invalid", f"{name}: must be a number of seconds above zero")
    return float(value)


def _allow(request: Request, method: str) -> None:
    if request.method != method:
        raise ApiError(
            "method_not_allowed", f"{request.method} is not allowed on {request.path}; use {method}"
        )
