"""What each REST call does, apart from HTTP: apply, get and delete against the store.

Kept free of sockets so the request logic is tested on its own and the HTTP layer stays thin.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from meshctl.control.store import (
    Delete,
    NotFound,
    Put,
    SidecarStatus,
    StaleVersion,
    Store,
    StoredResource,
)
from meshctl.resources import ResourceRef, ValidationFailed, check_references, validate_documents
from meshctl.resources.errors import Issue
from meshctl.resources.kinds import UnknownKind, resolve_kind

# Each error code maps to one HTTP status and one CLI exit code, so scripts can tell a bad file
# (2) from a lost race (3) from a missing resource (4) without parsing messages.
ERRORS: dict[str, tuple[int, int]] = {
    "invalid": (422, 2),
    "conflict": (409, 3),
    "not_found": (404, 4),
    "bad_request": (400, 2),
    "unauthorized": (401, 1),
    "forbidden": (403, 1),
    "too_large": (413, 2),
    "method_not_allowed": (405, 1),
    "unavailable": (503, 1),
    "internal": (500, 1),
}


class ApiError(Exception):
    def __init__(self, code: str, message: str, details: Sequence[Issue] = ()) -> None:
        super().__init__(message)
        self.code, self.message, self.details = code, message, list(details)

    @property
    def status(self) -> int:
        return ERRORS[self.code][0]

    def as_json(self) -> dict[str, Any]:
        return {
            "error": {
                "code": self.code,
                "message": self.message,
                "exit_code": ERRORS[self.code][1],
                "details": [issue.as_json() for issue in self.details],
            }
        }


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


class Api:
    """The REST API's logic over one store."""

    def __init__(self, store: Store, extensions: Sequence[Any] = ()) -> None:
        self.store = store
        # Further endpoint groups (the service registry): objects with handles(parts) and
        # async handle(request, parts), asked in order after the resource endpoints. One may
        # also have resource_status(item), whose fields join a resource's status as `meshctl
        # get` shows it (the global rate limit service's counts).
        self.extensions = list(extensions)
        # Reference checks read the whole state and then write: two writers interleaving could
        # each pass a check the other invalidates (apply a VS while its DR is deleted).
        self._write_lock = trio.Lock()

    async def handle(self, request: Request) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON body). Raises ApiError for refusals."""
        parts = [part for part in request.path.split("/") if part]
        if parts == ["healthz"]:
            return 200, {"status": "ok"}
        if parts[:1] != ["v1"]:
            raise ApiError("not_found", f"no such endpoint {request.path}")
        for extension in self.extensions:
            if extension.handles(parts):
                return await extension.handle(request, parts)
        if parts == ["v1", "apply"]:
            _allow(request, "POST")
            return 200, await self.apply(request.body, _flag(request.query, "dryRun"))
        if parts[1:2] == ["resources"] and 2 <= len(parts) <= 5 and len(parts) != 4:
            kind = _kind(parts[2]) if len(parts) > 2 else None
            if len(parts) == 5:
                ref = ResourceRef(kind, parts[3], parts[4])
                if request.method == "DELETE":
                    return 200, await self.delete(ref, _int(request.query, "version"))
                _allow(request, "GET")
                return 200, await self.get(ref)
            _allow(request, "GET")
            return 200, await self.list(kind, request.query.get("namespace"))
        raise ApiError("not_found", f"no such endpoint {request.path}")

    async def apply(self, body: bytes, dry_run: bool = False) -> dict[str, Any]:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ApiError("invalid", f"the request body is not UTF-8 text: {error}") from None
        try:
            resources = validate_documents(text)
        except ValidationFailed as failed:
            raise ApiError("invalid", _summary(failed.issues), failed.issues) from None
        if not resources:
            raise ApiError("invalid", "no resources in the input")
        async with self._write_lock:
            _, stored = await self.store.snapshot()
            current = {item.ref: item for item in stored}
            state = {ref: item.body for ref, item in current.items()}
            state.update({resource.ref: resource.body for resource in resources})
            issues = check_references(state.values())
            if issues:
                raise ApiError("invalid", _summary(issues), issues)
            puts = [Put(r.ref, r.body, r.expected_version, r.not_enforced) for r in resources]
            try:
                if dry_run:
                    revision, results = (
                        self.store.revision,
                        [_preview(put, current) for put in puts],
                    )
                else:
                    revision, writes = await self.store.write(puts)
                    results = [(w.ref, w.action, w.version) for w in writes]
            except StaleVersion as stale:
                raise ApiError("conflict", str(stale)) from None
        not_enforced = {r.ref: r.not_enforced for r in resources}
        return {
            "revision": revision,
            "dryRun": dry_run,
            "results": [
                {
                    **_ref_json(ref),
                    "action": action,
                    "version": version,
                    "notEnforced": list(not_enforced[ref]),
                }
                for ref, action, version in results
            ],
        }

    async def delete(self, ref: ResourceRef, expected_version: int | None) -> dict[str, Any]:
        async with self._write_lock:
            _, stored = await self.store.snapshot()
            state = {item.ref: item.body for item in stored}
            if state.pop(ref, None) is None:
                raise ApiError("not_found", f"{ref} not found")
            issues = check_references(state.values())
            if issues:
                raise ApiError(
                    "invalid", f"deleting {ref} would leave routes to undefined subsets", issues
                )
            try:
                revision, results = await self.store.write([Delete(ref, expected_version)])
            except StaleVersion as stale:
                raise ApiError("conflict", str(stale)) from None
            except NotFound as missing:
                raise ApiError("not_found", str(missing)) from None
        return {
            "revision": revision,
            "results": [{**_ref_json(ref), "action": "deleted", "version": results[0].version}],
        }

    async def get(self, ref: ResourceRef) -> dict[str, Any]:
        item = await self.store.get(ref)
        if item is None:
            raise ApiError("not_found", f"{ref} not found")
        statuses = await self.store.statuses([ref])
        return self._with_extension_status(item, _item_json(item, statuses[ref]))

    async def list(self, kind: str | None, namespace: str | None) -> dict[str, Any]:
        items = await self.store.list(kind, namespace)
        statuses = await self.store.statuses([item.ref for item in items]) if items else {}
        return {
            "revision": self.store.revision,
            "items": [
                self._with_extension_status(item, _item_json(item, statuses.get(item.ref, []))) for item in items
            ],
        }

    def _with_extension_status(self, item: StoredResource, body: dict[str, Any]) -> dict[str, Any]:
        for extension in self.extensions:
            status = getattr(extension, "resource_status", None)
            extra = status(item) if status is not None else None
            if extra:
                body["status"].update(extra)
        return body


def _item_json(item: StoredResource, sidecars: list[SidecarStatus]) -> dict[str, Any]:
    body = dict(item.body)
    body["metadata"] = {**body["metadata"], "resourceVersion": str(item.version)}
    body["status"] = {
        # Filled by the xDS server from each sidecar's ACK or NACK of the config built from this.
        "sidecars": {
            status.sidecar_id: {
                "state": status.state,
                "version": status.version,
                **({"reason": status.reason} if status.reason else {}),
            }
            for status in sidecars
        },
        "notEnforced": list(item.not_enforced),
    }
    return body


def _preview(put: Put, current: dict[ResourceRef, StoredResource]) -> tuple[ResourceRef, str, int]:
    existing = current.get(put.ref)
    actual = existing.version if existing else None
    if put.expected_version is not None and actual != put.expected_version:
        raise StaleVersion(put.ref, put.expected_version, actual)
    if existing is None:
        return put.ref, "created", 0
    if existing.body == put.body and existing.not_enforced == put.not_enforced:
        return put.ref, "unchanged", existing.version
    return put.ref, "updated", existing.version


def _ref_json(ref: ResourceRef) -> dict[str, str]:
    return {"kind": ref.kind, "namespace": ref.namespace, "name": ref.name}


def _summary(issues: list[Issue]) -> str:
    count = len(issues)
    return f"{count} problem{'s' if count != 1 else ''} found; nothing was changed"


def _kind(name: str) -> str:
    try:
        return resolve_kind(name).kind
    except UnknownKind as error:
        raise ApiError("bad_request", str(error)) from None


def _allow(request: Request, method: str) -> None:
    if request.method != method:
        raise ApiError(
            "method_not_allowed", f"{request.method} is not allowed on {request.path}; use {method}"
        )


def _flag(query: dict[str, str], name: str) -> bool:
    return query.get(name, "").lower() in ("1", "true", "yes")


def _int(query: dict[str, str], name: str) -> int | None:
    value = query.get(name)
    if value is None:
        return None
    if not value.isdigit():
        raise ApiError("bad_request", f"query parameter {name}={value!r} is not a version number")
    return int(value)
