"""What the two RateLimit status extensions share (global rules' counts from the rate limit service,
local rules' from the sidecars' reports): they serve no endpoint of their own, and read a stored
RateLimit's namespace, name and rules."""

from __future__ import annotations

from typing import Any


class RateLimitStatusExtension:
    """An API extension that only adds fields to RateLimits' status (`resource_status`)."""

    def handles(self, parts: Any) -> bool:
        return False  # no endpoints of its own

    async def handle(self, request: Any, parts: Any) -> Any:  # pragma: no cover - never asked
        raise NotImplementedError

    def resource_status(self, item: Any) -> dict[str, Any] | None:
        found = stored_rules(item)
        return None if found is None else self.rules_status(*found)

    def rules_status(self, namespace: str, name: str, rules: list[Any]) -> dict[str, Any] | None:
        raise NotImplementedError


def stored_rules(item: Any) -> tuple[str, str, list[Any]] | None:
    """(namespace, name, spec.rules as stored) of a RateLimit; None for any other kind."""
    body = item.body
    if body.get("kind") != "RateLimit":
        return None
    metadata = body.get("metadata", {})
    return metadata.get("namespace", "default"), metadata.get("name", ""), body.get("spec", {}).get("rules", [])
