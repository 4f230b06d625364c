"""The sidecar's local rate limit counts as it reports them with each lease renewal: the engine's
cumulative allowed and limited per configured descriptor, summed per RateLimit rule (the rule a
compiled descriptor names), so the plane can show each rule's last minute mesh-wide."""

from __future__ import annotations

import logging
from typing import Any

from meshctl.resources.rate_limit import DESCRIPTOR_KEY, MAX_REPORTED_RULES

log = logging.getLogger("meshctl.agent")


def rule_counts(engine: Any) -> dict[str, dict[str, int]]:
    """{rule: {"allowed": N, "limited": M}} over every filter config naming the rule (the enforced
    and the shadow instance, each virtual host's); descriptors meshctl did not compile (a
    hand-written bootstrap's) are not rules and are left out. At most one entry per rule the
    engine's config holds."""
    counts: dict[str, dict[str, int]] = {}
    for _stat_prefix, descriptor, allowed, limited in engine.local_rate_limit_counts():
        if len(descriptor) != 1 or descriptor[0][0] != DESCRIPTOR_KEY:
            continue
        entry = counts.setdefault(descriptor[0][1], {"allowed": 0, "limited": 0})
        entry["allowed"] += allowed
        entry["limited"] += limited
    if len(counts) > MAX_REPORTED_RULES:
        # The plane would refuse the whole renewal: report the first rules by name, keep the lease.
        log.warning("%d rate limit rules; reporting the counts of %d", len(counts), MAX_REPORTED_RULES)
        counts = dict(sorted(counts.items())[:MAX_REPORTED_RULES])
    return counts
