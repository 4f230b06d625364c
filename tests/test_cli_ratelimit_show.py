"""`meshctl ratelimit show`'s table from RateLimits as the API returns them (spec as stored, status
with localRules / globalRules): every kind of rule gets a row, whatever fields it leaves out."""

from __future__ import annotations

from meshctl.cli.ratelimit import render, rule_rows


def test_every_kind_of_rule_gets_a_row_with_its_figures():
    item = {
        "metadata": {"namespace": "default", "name": "reviews"},
        "spec": {"selector": {"matchLabels": {"app": "reviews"}}, "rules": [
            {"limit": {"requests": 100, "unit": "minute", "burst": 20}, "match": {"method": "GET", "path": {"prefix": "/api"}}},
            {"limit": {"requests": 5, "unit": "second"}, "scope": "global", "shadow": True},
            {"concurrency": {"maxConcurrent": 8, "queue": 4}},
            {"concurrency": {"adaptive": True}},
            {"concurrency": {"adaptive": True, "maxConcurrent": 50}},
        ]},
        "status": {
            "localRules": [{"rule": 0, "allowedLastMinute": 90, "limitedLastMinute": 30, "requestsPerSecond": 2.0}],
            "globalRules": [{"rule": 1, "allowedLastMinute": 240, "limitedLastMinute": 60}],
        },
    }  # fmt: skip
    rows = rule_rows([item])
    assert rows == [
        ("default/reviews", "0", "local", "GET /api*", "100/minute +20 burst", "90", "30", "2.00"),
        ("default/reviews", "1", "global shadow", "*", "5/second", "240", "60", "5.00"),
        ("default/reviews", "2", "local", "*", "8 at once", "-", "-", "-"),
        ("default/reviews", "3", "local", "*", "adaptive", "-", "-", "-"),
        ("default/reviews", "4", "local", "*", "adaptive, at most 50 at once", "-", "-", "-"),
    ]
    assert render(rows).splitlines()[0].split() == [
        "RATELIMIT", "RULE", "SCOPE", "MATCH", "LIMIT", "ALLOWED/1m", "LIMITED/1m", "RATE/s",
    ]  # fmt: skip
