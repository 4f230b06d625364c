"""An API extension: a RateLimit's status shows, per local rule, the requests the mesh's sidecars
allowed and limited in the last minute, their current rate, and how many sidecars report the rule
(from the counts they send with their lease renewals: ratelimit_local_counts). Shadow rules show
what they would have done."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from meshctl.control.compiler_ratelimit_global import rule_name
from meshctl.control.ratelimit_local_counts import LocalRuleCounts, RuleFigures
from meshctl.control.ratelimit_status import RateLimitStatusExtension


def limit_text(limit: Any) -> str:
    """'100 per second', '+ 20 burst' when the rule has one (the spec as stored)."""
    if not isinstance(limit, dict):
        return ""
    text = f"{limit.get('requests')} per {limit.get('unit')}"
    return f"{text} + {limit['burst']} burst" if limit.get("burst") else text


class LocalRateLimitStatus(RateLimitStatusExtension):
    """`status.localRules` of a RateLimit: one entry per rule with `scope: local` and a limit;
    `clock` is the registry's (the samples' timestamps)."""

    def __init__(self, counts: LocalRuleCounts, clock: Callable[[], float]) -> None:
        self.counts = counts
        self.clock = clock

    def rules_status(self, namespace: str, name: str, rules: list[Any]) -> dict[str, Any] | None:
        local = [
            (index, rule) for index, rule in enumerate(rules)
            if isinstance(rule, dict) and rule.get("scope", "local") == "local" and rule.get("limit") is not None
        ]  # fmt: skip
        if not local:
            return None
        figures = self.counts.figures({rule_name(namespace, name, index) for index, _ in local}, self.clock())
        rules = []
        for index, rule in local:
            found = figures.get(rule_name(namespace, name, index), RuleFigures())
            rules.append({
                "rule": index, "limit": limit_text(rule.get("limit")),
                "allowedLastMinute": found.allowed_last_minute, "limitedLastMinute": found.limited_last_minute,
                "requestsPerSecond": found.requests_per_second, "sidecars": found.sidecars,
            })  # fmt: skip
        return {"localRules": rules}
