"""The global rate limit service's counting, on a clock the test moves: burst carried over from a quiet
window, the cap on live counters, and batched quota keeping 10 sidecars sharing one limit within 5 %
of it (each sidecar admits its grant on its own, as the engine's client does)."""

from __future__ import annotations

import heapq

import pytest
from meshctl.control.ratelimit_counters import GlobalCounters, GlobalRule

MINUTE = 60.0
START = 1_000_020.0  # a minute window starts at 1_000_020 (a multiple of 60)


def counters(*rules: GlobalRule, max_counters: int = 100) -> GlobalCounters:
    found = GlobalCounters(max_counters)
    found.set_rules(rules)
    return found


def admitted(limits: GlobalCounters, name: str, count: int, now: float) -> int:
    return sum(limits.decide([name], 0, now)[0].ok for _ in range(count))


def test_burst_is_what_the_last_window_left_unused_at_most_burst():
    limits = counters(GlobalRule("r", requests=10, unit_seconds=60, burst=5))
    assert admitted(limits, "r", 20, START) == 15  # after a quiet spell: requests + burst
    assert admitted(limits, "r", 20, START + MINUTE) == 10  # the last window left nothing
    assert admitted(limits, "r", 7, START + 2 * MINUTE) == 7  # leaves 3 unused
    assert admitted(limits, "r", 20, START + 3 * MINUTE) == 13
    assert admitted(limits, "r", 20, START + 5 * MINUTE) == 15  # a whole window quiet: full again


def test_counters_past_the_cap_answer_ok_and_are_counted_and_ended_windows_are_dropped():
    limits = counters(*(GlobalRule(name, 1, 1) for name in "abc"), max_counters=2)
    assert admitted(limits, "a", 2, START) == 1
    assert admitted(limits, "b", 2, START) == 1
    assert admitted(limits, "c", 2, START) == 2  # no counter for c: fail open, counted
    assert limits.counters_capped == 2 and limits.live_counters() == 2
    assert admitted(limits, "c", 2, START + 3) == 1  # a and b's windows ended: dropped, room for c
    assert limits.live_counters() == 1


@pytest.mark.parametrize(
    "rates",
    [[10, 20, 50, 100, 200, 300, 500, 800, 1000, 2000], [100] * 10, [5] * 10, [1] * 9 + [2000]],
    ids=["mixed", "even", "slow", "one-busy"],
)
def test_ten_sidecars_sharing_a_limit_with_quota_stay_within_five_percent_of_it(rates):
    """10 sidecars, each offering its own steady rate (requests a second), 5 % more in all than the
    limit allows: each admits from its grant while it is valid and asks the service otherwise.
    Unused grants that expire are the only error: what passes stays within 5 % under the limit."""
    limit = int(sum(rates) * MINUTE / 1.05)
    limits = counters(GlobalRule("r", requests=limit, unit_seconds=60))
    grants = {sidecar: (0, 0.0) for sidecar in range(10)}  # left, valid until
    passed = calls = 0  # calls: those that admitted a request (a refused one calls every time)
    arrivals = [(START + 1 / (3 * rate), sidecar) for sidecar, rate in enumerate(rates)]
    heapq.heapify(arrivals)
    while arrivals:
        now, sidecar = heapq.heappop(arrivals)
        if now >= START + MINUTE:
            continue  # this window is what is measured
        left, valid_until = grants[sidecar]
        if left > 0 and now < valid_until:
            grants[sidecar] = (left - 1, valid_until)
            passed += 1
        else:
            (verdict,) = limits.decide(["r"], 0, now, f"sidecar-{sidecar}", want_quota=True)
            if verdict.ok:
                calls += 1
                passed += 1
                if verdict.quota is not None:
                    grants[sidecar] = (verdict.quota.requests, verdict.quota.valid_until)
        heapq.heappush(arrivals, (now + 1 / rates[sidecar], sidecar))
    print(f"{passed} passed of a limit of {limit}, {calls} calls")
    assert 0.95 * limit <= passed <= limit
    # Most requests are decided by the sidecar (a 5 req/s sidecar still calls for every 2 or 3).
    assert calls < passed / 2


def test_no_quota_without_asking_for_it_nor_for_shadow_rules_nor_beyond_what_is_left():
    limits = counters(GlobalRule("r", 1000, 60), GlobalRule("s", 1000, 60, shadow=True))
    assert limits.decide(["r"], 0, START, "a")[0].quota is None
    assert limits.decide(["s"], 0, START, "a", want_quota=True)[0].quota is None
    first = limits.decide(["r"], 0, START, "a", want_quota=True)[0].quota
    assert first is not None and first.requests <= 1000 // 200 and first.valid_until <= START + 1
    small = counters(GlobalRule("r", 100, 60))
    assert small.decide(["r"], 0, START, "a", want_quota=True)[0].quota is None  # 1/200 of 99 is nothing
