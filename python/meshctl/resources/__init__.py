"""Mesh resources: the Istio-compatible schemas, how YAML becomes them, and their validation."""

from meshctl.resources.errors import Issue, ResourceRef, ValidationFailed
from meshctl.resources.kinds import KINDS, KindInfo, resolve_kind
from meshctl.resources.validate import Resource, check_references, validate_documents

__all__ = [
    "KINDS",
    "Issue",
    "KindInfo",
    "Resource",
    "ResourceRef",
    "ValidationFailed",
    "check_references",
    "resolve_kind",
    "validate_documents",
]
