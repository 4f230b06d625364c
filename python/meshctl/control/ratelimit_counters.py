"""The global rate limit service's arithmetic, sans IO: the rules (one per global RateLimit rule),
fixed-window counters, burst carried over from a quiet window, shadow counting, and batched quota.

Windows are fixed and aligned to the epoch per unit, as Envoy's reference ratelimit service
counts (a minute window is [hh:mm:00, hh:mm+1:00)). `burst` is meshctl's: as the local token
bucket saves up to `burst` tokens in a quiet spell, a window admits `requests` plus what the
previous window left unused, at most `burst` (a window after a fully quiet one admits
requests + burst; a counter that is gone counts as quiet).

A request is admitted only if every enforced rule it names has room; only then is it counted
against them (as the local filter takes no token from any bucket when one refuses). Shadow rules
count every request they see and never refuse. Time is passed in, so tests need no clock.

The arithmetic a store shares (window index, the grant a caller is due, the cap on it, the verdict
from what a window counted) is module-level here; GlobalCounters keeps the windows in memory (one
plane), ratelimit_redis in Redis (several planes), with the same tests run on both.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

# Live counters at most (one per rule with traffic in its current or previous window). A rule
# beyond the cap is answered OK (fail open, as an unreachable service would be) and counted.
MAX_COUNTERS = 100_000
# Quota: a grant is at most this share of what is left in the window, so 10 sidecars each
# holding an unused grant leave at most 10/200 = 5 % of the window's remainder unused.
QUOTA_SHARE = 200
# A grant expires this soon (and never after the window ends): an unused grant wastes little.
QUOTA_SECONDS = 1.0
# A caller's first grant. One that comes back before its grant expired used it up: its next grant
# is what it admits in half the grant's life at the rate it just showed (so a steady caller uses
# each grant up well before it expires); one that let a grant expire gets half the last.
FIRST_GRANT = 4
# A caller back sooner than this after its last sized grant asked while that call was under way
# (its sidecar had several requests waiting for quota at once): it gets that size again, and the
# grant that sizes its next one stays the earlier. A rate measured over so short a time is the
# sidecar's concurrency, not its rate; sizing on it made each concurrent ask larger than the one
# before, until unused grants had spent the window.
CONCURRENT_ASK_SECONDS = 0.005
HISTORY_SECONDS = 60  # what `meshctl get ratelimit` reports: the last minute


class CountersUnavailable(Exception):
    """A shared counter store (ratelimit_redis) did not answer in time, or refused: the message says which."""


@dataclass(frozen=True)
class GlobalRule:
    """One global rule: `requests` per `unit_seconds`, plus up to `burst` saved from the last window."""

    name: str  # the descriptor value: namespace/name/index
    requests: int
    unit_seconds: int
    burst: int = 0
    shadow: bool = False
    headers: tuple[tuple[str, str], ...] = ()  # added to a refused request's response


@dataclass(frozen=True)
class Grant:
    requests: int
    valid_until: float


@dataclass(frozen=True)
class Verdict:
    """One descriptor's answer: whether its own rule had room (the request as a whole is admitted
    only if every descriptor's is ok); `known` False for a descriptor no rule names (answered OK)."""

    rule: GlobalRule | None
    ok: bool
    limit: int = 0
    remaining: int = 0
    reset_in: float = 0.0
    quota: Grant | None = None

    @property
    def known(self) -> bool:
        return self.rule is not None


def window_index(rule: GlobalRule, now: float) -> int:
    return math.floor(now / rule.unit_seconds)


def window_end(rule: GlobalRule, index: int) -> float:
    return (index + 1) * rule.unit_seconds


def grant_cap(left: int) -> int:
    """The most a grant may be when `left` requests remain in the window (0: no grant)."""
    share = left // QUOTA_SHARE
    return min(share, left) if share > 0 else 0


class CallerGrants:
    """Each caller's last grant per rule in the current window, which sizes its next one. Grants
    are per sidecar connection, so each plane keeps its own callers' (a sidecar asks one plane)."""

    def __init__(self) -> None:
        # (caller, rule) → (window index, size, granted at, valid until, window end)
        self._last: dict[tuple[str, str], tuple[int, int, float, float, float]] = {}

    def wanted(self, caller: str, rule: str, index: int, now: float) -> int:
        """The grant `caller` is due before the window's cap (grant_cap) applies."""
        previous = self._last.get((caller, rule))
        if previous is None or previous[0] != index:
            return FIRST_GRANT
        _, last, granted_at, expiry, _ = previous
        if now - granted_at < CONCURRENT_ASK_SECONDS:
            return last
        if now < expiry:  # back before it expired: it used `last` up in now - granted_at
            rate = (last + 1) / (now - granted_at)
            return max(1, int(rate * QUOTA_SECONDS / 2))
        return max(1, last // 2)

    def record(self, caller: str, rule: str, index: int, grant: Grant, now: float, end: float) -> None:
        previous = self._last.get((caller, rule))
        if previous is not None and previous[0] == index and now - previous[2] < CONCURRENT_ASK_SECONDS:
            return  # a concurrent ask: the grant it was sized on still sizes the next
        self._last[(caller, rule)] = (index, grant.requests, now, grant.valid_until, end)

    def sweep(self, now: float) -> None:
        """Forget the grants of ended windows (a new window starts from FIRST_GRANT)."""
        for key, entry in list(self._last.items()):
            if entry[4] <= now:
                del self._last[key]

    def forget(self, rules: Iterable[str]) -> None:
        gone = set(rules)
        for key in [key for key in self._last if key[1] in gone]:
            del self._last[key]


def verdict(
    rule: GlobalRule, *, room: bool, admitted: bool, limit: int, used: int, end: float, now: float,
    want_quota: bool, granted: int,
) -> Verdict:  # fmt: skip
    """One known descriptor's verdict from what its window counted (`used`, grants included):
    `room` for this request alone, `admitted` for the request as a whole, `granted` the grant
    counted for it (0: none)."""
    grant = None
    if want_quota and not rule.shadow:
        if admitted and granted > 0:
            grant = Grant(granted, min(end, now + QUOTA_SECONDS))
        elif not room:
            # A refusal the caller may repeat on its own until then (an empty grant): refused
            # traffic stops calling too. Short, so a raised limit applies within QUOTA_SECONDS.
            grant = Grant(0, min(end, now + QUOTA_SECONDS))
    return Verdict(rule, ok=room or rule.shadow, limit=limit, remaining=max(0, limit - used),
                   reset_in=max(0.0, end - now), quota=grant)  # fmt: skip


@dataclass
class _Window:
    index: int  # floor(time / unit)
    limit: int  # requests admitted in this window, burst included
    used: int = 0  # requests counted (shadow: seen)


@dataclass
class _History:
    """Allowed and limited per second over the last minute, for one rule."""

    seconds: deque[tuple[int, int, int]] = field(default_factory=deque)  # (second, allowed, limited)

    def add(self, now: float, allowed: int, limited: int) -> None:
        second = int(now)
        if self.seconds and self.seconds[-1][0] == second:
            _, a, b = self.seconds[-1]
            self.seconds[-1] = (second, a + allowed, b + limited)
        else:
            self.seconds.append((second, allowed, limited))
        self.trim(now)

    def trim(self, now: float) -> None:
        while self.seconds and self.seconds[0][0] <= int(now) - HISTORY_SECONDS:
            self.seconds.popleft()

    def totals(self, now: float) -> tuple[int, int]:
        self.trim(now)
        return sum(s[1] for s in self.seconds), sum(s[2] for s in self.seconds)


class GlobalCounters:
    """Rules by descriptor value, and their counters."""

    def __init__(self, max_counters: int = MAX_COUNTERS) -> None:
        self.max_counters = max_counters
        self._rules: dict[str, GlobalRule] = {}
        self._windows: dict[str, _Window] = {}
        self._history: dict[str, _History] = {}
        self.counters_capped = 0  # requests answered OK because the counter cap was hit
        self.unknown_descriptors = 0
        self._grants = CallerGrants()
        self._next_sweep = 0.0

    # --- rules ------------------------------------------------------------------------------

    def set_rules(self, rules: Iterable[GlobalRule]) -> None:
        """Replace the rules. A rule whose unit changed counts afresh; one whose requests or burst
        changed keeps what its window counted, against the new limit (applied at once)."""
        new = {rule.name: rule for rule in rules}
        for name in list(self._windows):
            old = self._rules.get(name)
            rule = new.get(name)
            if rule is None or old is None or rule.unit_seconds != old.unit_seconds:
                del self._windows[name]
            elif rule != old:
                window = self._windows[name]
                window.limit = rule.requests + min(rule.burst, max(0, window.limit - old.requests))
        for name in list(self._history):
            if name not in new:
                del self._history[name]
        self._grants.forget(name for name, old in self._rules.items()
                            if name not in new or new[name].unit_seconds != old.unit_seconds)  # fmt: skip
        self._rules = new

    def rule(self, name: str) -> GlobalRule | None:
        return self._rules.get(name)

    @property
    def rules(self) -> Mapping[str, GlobalRule]:
        return self._rules

    def live_counters(self) -> int:
        return len(self._windows)

    def statistics(self) -> dict[str, int]:
        return {
            "rules": len(self._rules),
            "live_counters": len(self._windows),
            "counters_capped": self.counters_capped,
            "unknown_descriptors": self.unknown_descriptors,
        }

    # --- deciding ---------------------------------------------------------------------------

    def decide(
        self, names: Sequence[str | None], hits: int, now: float, caller: str = "", want_quota: bool = False
    ) -> list[Verdict]:
        """One verdict per descriptor (None: not a descriptor of ours). `hits` is hits_addend
        (0 means 1). With `want_quota`, an admitted request's descriptors may get a grant, and a
        descriptor whose rule had no room an empty one: a refusal until its valid_until."""
        hits = hits or 1
        if now >= self._next_sweep:  # once a second: a sweep walks every counter
            self.sweep(now)
            self._next_sweep = now + 1.0
        rules = [self._rules.get(name) if name is not None else None for name in names]
        self.unknown_descriptors += sum(rule is None for rule in rules)
        windows = [self._window(rule, now) if rule is not None else None for rule in rules]
        admitted = all(
            window is None or rule is None or rule.shadow or window.used + hits <= window.limit
            for rule, window in zip(rules, windows)
        )
        verdicts = []
        for rule, window in zip(rules, windows):
            if rule is None:
                verdicts.append(Verdict(None, True))
                continue
            if window is None:  # the cap on counters: fail open
                self.counters_capped += 1
                verdicts.append(Verdict(rule, True))
                continue
            room = window.used + hits <= window.limit
            if admitted or rule.shadow:
                window.used += hits
            # Shadow: what the rule would have done; enforced: what was done to the request.
            passed = room if rule.shadow else admitted
            history = self._history.setdefault(rule.name, _History())
            history.add(now, hits if passed else 0, 0 if passed else hits)
            granted = 0
            if want_quota and admitted and not rule.shadow:
                wanted = self._grants.wanted(caller, rule.name, window.index, now)
                granted = min(wanted, grant_cap(window.limit - window.used))
                window.used += granted  # counted now: the caller admits them on its own
                history.add(now, granted, 0)
            end = window_end(rule, window.index)
            found = verdict(rule, room=room, admitted=admitted, limit=window.limit, used=window.used,
                            end=end, now=now, want_quota=want_quota, granted=granted)  # fmt: skip
            if found.quota is not None and found.quota.requests > 0:
                self._grants.record(caller, rule.name, window.index, found.quota, now, end)
            verdicts.append(found)
        return verdicts

    async def decide_async(
        self, names: Sequence[str | None], hits: int, now: float, caller: str = "", want_quota: bool = False
    ) -> list[Verdict]:
        """decide(), as the service calls every store (the Redis one waits on the network)."""
        return self.decide(names, hits, now, caller, want_quota)

    def _window(self, rule: GlobalRule, now: float) -> _Window | None:
        index = window_index(rule, now)
        window = self._windows.get(rule.name)
        if window is not None and window.index >= index:
            return window  # (a clock stepped back stays in the window it had reached)
        if window is not None and window.index == index - 1:
            carried = min(rule.burst, max(0, window.limit - window.used))
        else:
            carried = rule.burst  # quiet (or forgotten): as a full bucket
        if window is None and len(self._windows) >= self.max_counters:
            return None
        window = self._windows[rule.name] = _Window(index, rule.requests + carried)
        return window

    def sweep(self, now: float) -> None:
        """Drop counters whose windows ended before the previous one (nothing carries from them)."""
        for name, window in list(self._windows.items()):
            rule = self._rules.get(name)
            if rule is None or window.index < window_index(rule, now) - 1:
                del self._windows[name]
        self._grants.sweep(now)

    # --- reporting --------------------------------------------------------------------------

    def last_minute(self, name: str, now: float) -> tuple[int, int]:
        """(allowed, limited) requests for the rule over the last minute (quota grants count as
        allowed when granted)."""
        history = self._history.get(name)
        return history.totals(now) if history is not None else (0, 0)
