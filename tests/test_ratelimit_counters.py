"""The global rate limit service's counting, on a clock the test moves: burst carried over from a quiet
window, the cap on live counters, and batched quota keeping 10 sidecars sharing one limit within 5 %
of it (each sidecar admits its grant on its own, as the engine's client does).

The cases that apply to both run on both stores: this plane's memory and a real redis-server
(ratelimit_redis, started on a free port; its keys flushed between tests). Redis' own cases
(two planes on one Redis, Redis away, the mesh-wide history) are in tests/test_ratelimit_redis.py."""

from __future__ import annotations

import functools
import heapq
import queue
import threading
from collections.abc import Callable

import pytest
import trio
from helpers.redis_server import REDIS_SERVER, start_redis
from meshctl.control.ratelimit_counters import GlobalCounters, GlobalRule, Verdict

MINUTE = 60.0
START = 1_000_020.0  # a minute window starts at 1_000_020 (a multiple of 60)


class RedisStore:
    """A RedisCounters with GlobalCounters' sync `decide`, for the cases both stores share: each
    call runs on `trio_token`'s loop (one trio.run for the session, not one per decision)."""

    def __init__(self, url: str, trio_token: trio.lowlevel.TrioToken) -> None:
        from meshctl.control.ratelimit_redis import RedisCounters

        self.counters = RedisCounters(url)
        self.trio_token = trio_token

    def set_rules(self, rules) -> None:
        self.counters.set_rules(rules)

    def decide(self, names, hits, now, caller="", want_quota=False) -> list[Verdict]:
        call = functools.partial(self.counters.decide_async, names, hits, now, caller, want_quota)
        return trio.from_thread.run(call, trio_token=self.trio_token)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory):
    if REDIS_SERVER is None:
        pytest.skip("redis-server not installed (Debian redis-server; scripts/test.sh installs it)")
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def trio_loop():
    """A trio loop in a thread of its own, for the whole session: its token."""
    tokens: queue.Queue = queue.Queue()
    stop = threading.Event()

    async def run() -> None:
        tokens.put(trio.lowlevel.current_trio_token())
        await trio.to_thread.run_sync(stop.wait)

    thread = threading.Thread(target=trio.run, args=(run,), daemon=True)
    thread.start()
    yield tokens.get(timeout=10)
    stop.set()
    thread.join(timeout=10)


@pytest.fixture(params=["memory", "redis"])
def make_counters(request: pytest.FixtureRequest) -> Callable[..., object]:
    """A store holding `rules`: this plane's memory, or Redis (flushed first)."""

    def make(*rules: GlobalRule):
        if request.param == "memory":
            store: object = GlobalCounters()
        else:
            import redis

            url = request.getfixturevalue("redis_server").url
            redis.Redis.from_url(url).flushdb()
            store = RedisStore(url, request.getfixturevalue("trio_loop"))
        store.set_rules(rules)
        return store

    return make


def counters(*rules: GlobalRule, max_counters: int = 100) -> GlobalCounters:
    found = GlobalCounters(max_counters)
    found.set_rules(rules)
    return found


def admitted(limits, name: str, count: int, now: float) -> int:
    return sum(limits.decide([name], 0, now)[0].ok for _ in range(count))


def test_burst_is_what_the_last_window_left_unused_at_most_burst(make_counters):
    limits = make_counters(GlobalRule("r", requests=10, unit_seconds=60, burst=5))
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
def test_ten_sidecars_sharing_a_limit_with_quota_stay_within_five_percent_of_it(rates, make_counters):
    """10 sidecars, each offering its own steady rate (requests a second), 5 % more in all than the
    limit allows: each admits from its grant while it is valid and asks the service otherwise.
    Unused grants that expire are the only error: what passes stays within 5 % under the limit."""
    limit = int(sum(rates) * MINUTE / 1.05)
    limits = make_counters(GlobalRule("r", requests=limit, unit_seconds=60))
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


def test_a_sidecar_asking_many_times_at_once_gets_grants_that_do_not_grow_with_each_ask(make_counters):
    """A sidecar under load has many requests waiting for quota at once, and each asks: those asks
    come microseconds apart. Sized as a rate, each grant was larger than the one before (a window of
    10^9 was spent by unused grants within a second, and the sidecars answered 429); each gets the
    last size again instead, and the window keeps nearly all of its room."""
    limits = make_counters(GlobalRule("r", requests=1_000_000_000, unit_seconds=60))
    sizes = [limits.decide(["r"], 0, START + n * 1e-5, "sidecar", want_quota=True)[0].quota.requests
             for n in range(200)]  # fmt: skip
    assert sizes == [sizes[0]] * 200, sizes[:10]
    (after,) = limits.decide(["r"], 0, START + 0.01, "other", want_quota=True)
    assert after.ok and after.remaining > 999_000_000
    # Back later, it has used its grants up: its next grant grows with the rate it showed.
    (later,) = limits.decide(["r"], 0, START + 0.1, "sidecar", want_quota=True)
    assert later.quota.requests > sizes[0]


def test_no_quota_without_asking_for_it_nor_for_shadow_rules_nor_beyond_what_is_left(make_counters):
    limits = make_counters(GlobalRule("r", 1000, 60), GlobalRule("s", 1000, 60, shadow=True))
    assert limits.decide(["r"], 0, START, "a")[0].quota is None
    assert limits.decide(["s"], 0, START, "a", want_quota=True)[0].quota is None
    first = limits.decide(["r"], 0, START, "a", want_quota=True)[0].quota
    assert first is not None and first.requests <= 1000 // 200 and first.valid_until <= START + 1
    small = make_counters(GlobalRule("r", 100, 60))
    assert small.decide(["r"], 0, START, "a", want_quota=True)[0].quota is None  # 1/200 of 99 is nothing


def test_a_request_is_admitted_only_if_every_enforced_rule_has_room_and_shadow_rules_count_all(make_counters):
    limits = make_counters(GlobalRule("a", 3, 60), GlobalRule("b", 1, 60), GlobalRule("s", 1, 60, shadow=True))
    first = limits.decide(["a", "b", "s"], 0, START)
    assert [v.ok for v in first] == [True, True, True] and [v.remaining for v in first] == [2, 0, 0]
    second = limits.decide(["a", "b", "s"], 0, START + 1)
    # b is full: the request is refused, a counts nothing; the shadow rule counts it and says OK.
    assert [v.ok for v in second] == [True, False, True] and [v.remaining for v in second] == [2, 0, 0]
    assert [v.ok for v in limits.decide(["a"], 2, START + 2)] == [True]  # hits_addend 2
    assert [v.ok for v in limits.decide(["a", None], 0, START + 3)] == [False, True]  # None: not ours
    assert limits.decide(["a"], 0, START + 3)[0].reset_in == pytest.approx(MINUTE - 3)


def test_a_refused_caller_asking_for_quota_gets_an_empty_grant_within_the_window(make_counters):
    limits = make_counters(GlobalRule("r", 1, 1))
    assert limits.decide(["r"], 0, START, "a", want_quota=True)[0].ok
    (refused,) = limits.decide(["r"], 0, START + 0.5, "a", want_quota=True)
    assert not refused.ok and refused.quota is not None
    assert refused.quota.requests == 0 and refused.quota.valid_until == START + 1  # the window's end
