"""Markers for Istio fields this mesh refuses for now, or stores without enforcing yet."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Unsupported:
    """A real Istio field the sidecars cannot honour yet: refusing it beats silently ignoring it."""

    reason: str = "this mesh does not support it yet"


@dataclass(frozen=True)
class NotEnforced:
    """Kept and shown, but not yet acted on: a later issue enforces it without a re-apply."""

    reason: str = "stored, not yet enforced"


UNSUPPORTED = Unsupported()
NOT_ENFORCED = NotEnforced()
