"""The plane's per-rule figures from the counts sidecars report with their renewals: last minute
summed over sidecars, a sidecar younger than a minute counted from its first sample, counter
resets, bounded samples, and reports refused by field."""

from __future__ import annotations

import pytest
from meshctl.control.ratelimit_local_counts import (
    MAX_RULES,
    WINDOW,
    CountsError,
    LocalRuleCounts,
    parse_counts,
)
from meshctl.control.registry import Registry, Sidecar

RULE = "default/limits/0"


def test_last_minute_is_latest_minus_the_sample_a_minute_before_summed_over_sidecars():
    counts = LocalRuleCounts()
    # Sidecar a renews every 5 s from t=0: 10 allowed and 1 limited per renewal.
    for step in range(30):
        counts.record("a", {RULE: (10 * step, step)}, 5.0 * step)
    # Sidecar b appeared 20 s ago: counted from its first sample (40 allowed already then).
    counts.record("b", {RULE: (40, 0)}, 125.0)
    counts.record("b", {RULE: (100, 7)}, 145.0)
    figures = counts.figures({RULE, "default/limits/9"}, 145.0)
    assert set(figures) == {RULE}
    rule = figures[RULE]
    # a: latest (t=145) 290/29, a minute before (t=85) 170/17.
    assert (rule.allowed_last_minute, rule.limited_last_minute) == (120 + 60, 12 + 7)
    assert rule.sidecars == 2
    # a's rate over its last two samples: 11 per 5 s; b's: 67 per 20 s.
    assert rule.requests_per_second == pytest.approx(11 / 5 + 67 / 20, abs=0.01)
    # b goes quiet (it renews with another plane now): a minute on, it counts for nothing.
    counts.record("a", {RULE: (300, 30)}, 206.0)
    later = counts.figures({RULE}, 206.0)[RULE]
    assert later.sidecars == 1 and later.allowed_last_minute == 300 - 10 * 29


def test_a_counter_that_went_down_counts_from_zero_and_samples_stay_few():
    counts = LocalRuleCounts()
    for step in range(1000):  # renewing ten times a second for 100 s
        counts.record("a", {RULE: (step, 0)}, step / 10)
    assert len(counts._sidecars["a"].samples) <= WINDOW / (WINDOW / 16) + 2
    counts.record("a", {RULE: (3, 1)}, 100.0)  # the engine restarted
    rule = counts.figures({RULE}, 100.0)[RULE]
    assert (rule.allowed_last_minute, rule.limited_last_minute) == (3, 1)


def test_a_sidecar_that_leaves_the_registry_leaves_the_figures():
    now = [0.0]
    registry = Registry(clock=lambda: now[0])
    registry.register(Sidecar("a", "reviews", lease_seconds=3))
    registry.rate_limit_counts.record("a", {RULE: (5, 0)}, 0.0)
    registry.rate_limit_counts.record("a", {RULE: (9, 2)}, 1.0)
    assert registry.rate_limit_counts.figures({RULE}, 1.0)[RULE].allowed_last_minute == 4  # from its first sample
    now[0] = 4.0
    assert registry.expire() == ["a"]
    assert registry.rate_limit_counts.figures({RULE}, 4.0) == {}
    assert len(registry.rate_limit_counts) == 0


@pytest.mark.parametrize(("report", "field"), [
    ([1, 2], "rateLimitCounts: must map"),
    ({RULE: {"allowed": -1}}, f"rateLimitCounts.{RULE}.allowed"),
    ({RULE: {"allowed": 1.5}}, f"rateLimitCounts.{RULE}.allowed"),
    ({RULE: {"allowed": 1, "refused": 2}}, f"rateLimitCounts.{RULE}: must be"),
    ({f"r{i}": {} for i in range(MAX_RULES + 1)}, f"at most {MAX_RULES}"),
])  # fmt: skip
def test_a_bad_report_is_refused_by_field(report, field):
    with pytest.raises(CountsError, match=field.replace(".", r"\.").replace("{", r"\{")):
        parse_counts(report)


def test_a_struct_report_parses_to_counts():
    assert parse_counts({RULE: {"allowed": 3.0, "limited": 0}}) == {RULE: (3, 0)}


async def test_a_registration_with_a_bad_report_is_refused_naming_the_field_and_registers_nothing():
    import json

    from meshctl.control.api_handlers import ApiError
    from meshctl.control.registry_api import register

    registry = Registry()
    body = {"service": "reviews", "rateLimitCounts": {RULE: {"allowed": "many"}}}
    with pytest.raises(ApiError, match=rf"sidecar a: rateLimitCounts\.{RULE}\.allowed: 'many' is not a count"):
        await register(registry, "a", json.dumps(body).encode())
    assert registry.get("a") is None and len(registry.rate_limit_counts) == 0
    body["rateLimitCounts"] = {RULE: {"allowed": 4, "limited": 1}}
    await register(registry, "a", json.dumps(body).encode())
    assert registry.rate_limit_counts.figures({RULE}, registry.now())[RULE].limited_last_minute == 0  # its zero
    # A renewal with new counts changes no registration: nobody's config is compiled again.
    generation = registry.generation
    body["rateLimitCounts"] = {RULE: {"allowed": 9, "limited": 3}}
    answer = await register(registry, "a", json.dumps(body).encode())
    assert answer["changed"] is False and registry.generation == generation
    figures = registry.rate_limit_counts.figures({RULE}, registry.now())[RULE]
    assert (figures.allowed_last_minute, figures.limited_last_minute) == (5, 2)
