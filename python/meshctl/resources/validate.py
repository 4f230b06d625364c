"""Validate a batch of documents into resources: schema, field rules, then references across the batch."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from meshctl.resources import (
    authorization_policy,
    checks,
    fallback,
    peer_authentication,
    rate_limit,
    telemetry,
)
from meshctl.resources.common import Metadata
from meshctl.resources.documents import Document, parse_documents
from meshctl.resources.errors import Issue, ResourceRef, ValidationFailed, field_path
from meshctl.resources.hosts import canonical_host, host_matches
from meshctl.resources.kinds import KINDS, LATER_KINDS
from meshctl.resources.pydantic_errors import issues_from
from meshctl.resources.support import NotEnforced, Unsupported

_TOP_LEVEL = ("apiVersion", "kind", "metadata", "spec", "status")
_CHECKS = {
    "VirtualService": checks.virtual_service,
    "DestinationRule": checks.destination_rule,
    "ServiceEntry": checks.service_entry,
    "PeerAuthentication": peer_authentication.problems,
    "AuthorizationPolicy": authorization_policy.problems,
    "Fallback": fallback.problems,
    "RateLimit": rate_limit.problems,
    "Telemetry": telemetry.problems,
}


@dataclass(frozen=True)
class Resource:
    """One valid resource, ready to store. `body` is what `get` shows back (camelCase, as written)."""

    ref: ResourceRef
    body: dict[str, Any]
    # The version the writer last saw (metadata.resourceVersion); None applies unconditionally.
    expected_version: int | None = None
    not_enforced: tuple[str, ...] = field(default=())


def validate_documents(text: str) -> list[Resource]:
    """Every resource in a multi-document YAML text, or ValidationFailed listing every issue."""
    documents = parse_documents(text)
    resources: list[Resource] = []
    issues: list[Issue] = []
    seen: dict[ResourceRef, Document] = {}
    for document in documents:
        try:
            resource = validate_document(document)
        except ValidationFailed as failed:
            issues.extend(failed.issues)
            continue
        if resource.ref in seen:
            issues.append(
                Issue(
                    str(resource.ref),
                    "",
                    f"appears twice in one apply ({seen[resource.ref].where})",
                )
            )
        seen[resource.ref] = document
        resources.append(resource)
    if issues:
        raise ValidationFailed(issues)
    return resources


def validate_document(document: Document) -> Resource:
    data = document.data
    where = document.where
    if not isinstance(data, dict):
        raise ValidationFailed(
            [Issue(where, "", "expected a mapping with apiVersion, kind, metadata and spec")]
        )
    kind = data.get("kind")
    if not isinstance(kind, str):
        raise ValidationFailed([Issue(where, "kind", "required, e.g. VirtualService")])
    if kind in LATER_KINDS:
        raise ValidationFailed(
            [Issue(where, "kind", f"{kind} is not supported yet: {LATER_KINDS[kind]}")]
        )
    info = KINDS.get(kind)
    if info is None:
        known = ", ".join(KINDS)
        raise ValidationFailed(
            [Issue(where, "kind", f"unknown kind {kind!r}; known kinds: {known}")]
        )

    # Name the resource as early as possible: every later message then says which one it is.
    metadata_raw = data.get("metadata")
    raw_name = metadata_raw.get("name") if isinstance(metadata_raw, dict) else None
    raw_namespace = (
        metadata_raw.get("namespace", "default") if isinstance(metadata_raw, dict) else None
    )
    if isinstance(raw_name, str) and isinstance(raw_namespace, str):
        where = f"{kind} {raw_namespace}/{raw_name}"
    issues: list[Issue] = []

    api_version = data.get("apiVersion")
    if api_version not in info.api_versions:
        others = ", ".join(version.rpartition("/")[2] for version in info.api_versions[1:])
        also = f" (or {others})" if others else ""
        issues.append(
            Issue(where, "apiVersion", f"{api_version!r} is not served for {kind}; use {info.api_versions[0]}{also}")
        )
    for key in data:
        if key not in _TOP_LEVEL:
            issues.append(
                Issue(
                    where,
                    str(key),
                    "unknown field; a resource has apiVersion, kind, metadata, spec",
                )
            )

    metadata = _model(Metadata, metadata_raw, where, ("metadata",), issues)
    spec = _model(info.spec, data.get("spec"), where, ("spec",), issues)
    not_enforced: list[str] = []
    if spec is not None:
        check = _CHECKS.get(kind)
        if check is not None:
            issues.extend(Issue(where, path, reason) for path, reason in check(spec))
        for path, marker in marked_fields(spec, ("spec",)):
            if isinstance(marker, Unsupported):
                issues.append(Issue(where, path, f"{marker.reason}"))
            else:
                not_enforced.append(path)
    if issues:
        raise ValidationFailed(issues)
    assert metadata is not None and spec is not None
    ref = ResourceRef(kind, metadata.namespace, metadata.name)
    meta_body = metadata.model_dump(by_alias=True, exclude_none=True, exclude={"resource_version"})
    meta_body.setdefault("namespace", metadata.namespace)
    body = {
        "apiVersion": api_version,
        "kind": kind,
        "metadata": meta_body,
        # exclude_unset: what comes back is what was written, with no defaults added.
        "spec": spec.model_dump(by_alias=True, exclude_unset=True, mode="json"),
    }
    return Resource(ref, body, metadata.resource_version, tuple(not_enforced))


def _model(
    model: type[BaseModel], raw: Any, where: str, prefix: tuple[str, ...], issues: list[Issue]
) -> Any:
    if raw is None:
        issues.append(Issue(where, prefix[0], "required field is missing"))
        return None
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        issues.extend(issues_from(error, where, prefix, model))
        return None


def marked_fields(
    model: BaseModel, at: tuple[str | int, ...]
) -> Iterator[tuple[str, Unsupported | NotEnforced]]:
    """Every field set in `model` that is marked Unsupported or NotEnforced, by its path."""
    for name in sorted(model.model_fields_set):
        info = type(model).model_fields[name]
        value = getattr(model, name)
        if value is None:  # an explicit null states nothing
            continue
        here = (*at, info.alias or name)
        marker = next((m for m in info.metadata if isinstance(m, (Unsupported, NotEnforced))), None)
        if marker is not None:
            yield field_path(here), marker
            continue
        yield from _marked_in(value, here)


def _marked_in(
    value: Any, at: tuple[str | int, ...]
) -> Iterator[tuple[str, Unsupported | NotEnforced]]:
    if isinstance(value, BaseModel):
        yield from marked_fields(value, at)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _marked_in(item, (*at, index))
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _marked_in(item, (*at, key))


def check_references(bodies: Iterable[Mapping[str, Any]]) -> list[Issue]:
    """Subsets named by VirtualServices or Fallbacks that no DestinationRule defines, across the whole state.

    `bodies` is the state the store would hold after the change: stored resources with the
    batch laid over them (or with the deleted ones taken out).
    """
    subsets_by_host: dict[str, list[tuple[str, set[str]]]] = {}
    services = []
    for body in bodies:
        meta = body["metadata"]
        if body["kind"] == "DestinationRule":
            host = canonical_host(body["spec"]["host"], meta["namespace"])
            names = {subset["name"] for subset in body["spec"].get("subsets") or []}
            subsets_by_host.setdefault(host, []).append(
                (f"{meta['namespace']}/{meta['name']}", names)
            )
        elif body["kind"] in ("VirtualService", "Fallback"):
            services.append(body)
    issues = []
    for body in services:
        meta = body["metadata"]
        where = f"{body['kind']} {meta['namespace']}/{meta['name']}"
        for path, target in _subset_references(body):
            subset = target.get("subset")
            if subset is None:
                continue
            host = canonical_host(target["host"], meta["namespace"])
            rules = [
                rule
                for pattern, found in subsets_by_host.items()
                if host_matches(pattern, host)
                for rule in found
            ]
            if any(subset in names for _, names in rules):
                continue
            if not rules:
                reason = (
                    f"subset {subset!r} is not defined: no DestinationRule has host "
                    f"{target['host']!r} ({host})"
                )
            else:
                defined = "; ".join(
                    f"DestinationRule {rule} defines {', '.join(sorted(names)) or 'no subsets'}"
                    for rule, names in rules
                )
                reason = f"subset {subset!r} is not defined by any DestinationRule ({defined})"
            issues.append(Issue(where, path, reason))
    return issues


def _subset_references(body: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(path of the subset field, destination) for each destination a resource sends or mirrors to."""
    if body["kind"] == "Fallback":
        destination = (body["spec"].get("to") or {}).get("destination")
        if destination:
            yield "spec.to.destination.subset", destination
        return
    for route_index, route in enumerate(body["spec"].get("http") or []):
        here = f"spec.http[{route_index}]"
        for index, destination in enumerate(route.get("route") or []):
            yield f"{here}.route[{index}].destination.subset", destination["destination"]
        if route.get("mirror") is not None:
            yield f"{here}.mirror.subset", route["mirror"]
        for index, mirror in enumerate(route.get("mirrors") or []):
            yield f"{here}.mirrors[{index}].destination.subset", mirror["destination"]
