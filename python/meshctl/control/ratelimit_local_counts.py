"""Local rate limit counts reported by sidecars with their lease renewals, turned into mesh-wide
per-rule figures: requests allowed and limited over the last minute, and the current rate.

Each report is a sidecar engine's cumulative (allowed, limited) per rule (rule_name: namespace/
name/index). The plane keeps, per sidecar, a few timestamped samples in memory only (the registry
drops them with the lease), spaced at least SPACING apart: about WINDOW / SPACING + 2 samples per
sidecar however often it renews. A rule's last minute is the sum over sidecars of its latest
sample minus the newest sample at least WINDOW older (a sidecar seen for less than that: its
first sample); a counter that went down (the engine restarted, or the rule left its config and
came back) counts from zero, as Prometheus' increase() does. A sidecar that has not reported for
a minute (it renews with another plane now) counts for nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from meshctl.resources.rate_limit import MAX_REPORTED_RULES

WINDOW = 60.0
SPACING = WINDOW / 16
# A report naming more rules is refused by field, so memory per sidecar stays bounded.
MAX_RULES = MAX_REPORTED_RULES
MAX_COUNT = 2**53  # a JSON / protobuf Struct number is a double: exact below this

Counts = dict[str, tuple[int, int]]


class CountsError(ValueError):
    """A report that cannot be accepted; str() names the field and the reason."""


def parse_counts(value: Any) -> Counts:
    """`rateLimitCounts` of a registration: {rule: {"allowed": N, "limited": M}}."""
    if not isinstance(value, dict):
        raise CountsError("rateLimitCounts: must map rule names to {allowed, limited}")
    if len(value) > MAX_RULES:
        raise CountsError(f"rateLimitCounts: {len(value)} rules; at most {MAX_RULES}")
    counts: Counts = {}
    for rule, entry in value.items():
        if not isinstance(rule, str) or not rule or len(rule) > 512:
            raise CountsError(f"rateLimitCounts: {rule!r} is not a rule name")
        if not isinstance(entry, dict) or set(entry) - {"allowed", "limited"}:
            raise CountsError(f"rateLimitCounts.{rule}: must be {{allowed, limited}}")
        numbers = []
        for key in ("allowed", "limited"):
            number = entry.get(key, 0)
            # Struct numbers arrive as floats: whole ones are counts.
            if (isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number)
                    or number != int(number) or not 0 <= number < MAX_COUNT):  # fmt: skip
                raise CountsError(f"rateLimitCounts.{rule}.{key}: {number!r} is not a count")
            numbers.append(int(number))
        counts[rule] = (numbers[0], numbers[1])
    return counts


@dataclass
class _Sample:
    at: float
    counts: Counts


@dataclass
class _Sidecar:
    samples: list[_Sample] = field(default_factory=list)

    def add(self, sample: _Sample) -> None:
        samples = self.samples
        samples.append(sample)
        # The newest is always kept; an older one only if it is SPACING after the one before it.
        if len(samples) >= 3 and samples[-2].at - samples[-3].at < SPACING:
            del samples[-2]
        # The oldest is needed only while it is the newest sample at least WINDOW old.
        while len(samples) >= 2 and samples[1].at <= sample.at - WINDOW:
            del samples[0]


@dataclass(frozen=True)
class RuleFigures:
    """One rule, mesh-wide: requests allowed and limited over the last minute, the offered rate
    (allowed + limited per second) between each sidecar's last two samples, and the number of
    sidecars whose latest report names the rule."""

    allowed_last_minute: int = 0
    limited_last_minute: int = 0
    requests_per_second: float = 0.0
    sidecars: int = 0


def _increase(latest: int, base: int) -> int:
    return latest - base if latest >= base else latest


class LocalRuleCounts:
    """The samples of every sidecar that reported, by node id."""

    def __init__(self) -> None:
        self._sidecars: dict[str, _Sidecar] = {}

    def record(self, node_id: str, counts: Counts, now: float) -> None:
        self._sidecars.setdefault(node_id, _Sidecar()).add(_Sample(now, counts))

    def forget(self, node_id: str) -> None:
        self._sidecars.pop(node_id, None)

    def __len__(self) -> int:
        return len(self._sidecars)

    def figures(self, rules: set[str], now: float) -> dict[str, RuleFigures]:
        """`rules`' figures as of `now` (a rule no sidecar reports is left out)."""
        totals: dict[str, list[float]] = {}
        for sidecar in self._sidecars.values():
            samples = sidecar.samples
            latest = samples[-1]
            if latest.at <= now - WINDOW:
                # Nothing from it this last minute: a sidecar that now renews with another plane
                # (its shared registration keeps it here) must not keep counting as a reporter.
                continue
            base = next((s for s in reversed(samples) if s.at <= now - WINDOW), samples[0])
            previous = samples[-2] if len(samples) >= 2 else None
            for rule in rules & latest.counts.keys():
                allowed, limited = latest.counts[rule]
                base_allowed, base_limited = base.counts.get(rule, (0, 0))
                total = totals.setdefault(rule, [0, 0, 0.0, 0])
                total[0] += _increase(allowed, base_allowed)
                total[1] += _increase(limited, base_limited)
                if previous is not None and latest.at > previous.at:
                    before = previous.counts.get(rule, (0, 0))
                    offered = _increase(allowed, before[0]) + _increase(limited, before[1])
                    total[2] += offered / (latest.at - previous.at)
                total[3] += 1
        return {rule: RuleFigures(int(a), int(b), round(rate, 2), int(k)) for rule, (a, b, rate, k) in totals.items()}
