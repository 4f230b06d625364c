"""Istio's StringMatch as Envoy's StringMatcher, shared by the route and rate limit compilers."""

from __future__ import annotations

from typing import Any

from meshctl.resources.common import StringMatch


def string_match(match: StringMatch) -> dict[str, Any]:
    """`exact`, `prefix` or `regex` (as `safe_regex`, RE2 like Istio's)."""
    if match.exact is not None:
        return {"exact": match.exact}
    if match.prefix is not None:
        return {"prefix": match.prefix}
    return {"safe_regex": {"regex": match.regex}}
