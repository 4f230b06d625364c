"""The global rate limit counters in Redis, shared by several control planes (`meshctl serve
--ratelimit-store redis://HOST:PORT[/DB]`): the same windows, burst carry, shadow rules,
all-or-nothing admission and quota grants as the memory counters (ratelimit_counters), made
atomic across planes by one Lua script (EVALSHA: one round trip per decision).

What lives where:
- in Redis: per rule and window a hash {carried, used} (the key names the unit, so a rule whose
  unit changed counts afresh) that expires two windows after its window starts, so that the next
  window can still read what it left unused; per rule and second a hash {allowed, limited}
  (the last minute's history, shown by every plane's `meshctl get ratelimit NAME -o yaml`);
- in the plane: the rules (each plane follows the same store), and each caller's last grant,
  which sizes its next one (a sidecar asks one plane at a time: a caller that fails over to
  another plane starts again from a first grant there).
The script mirrors ratelimit_counters' arithmetic (window limit = requests + min(burst, carried);
the grant cap); tests/test_ratelimit_counters.py runs the same cases on both stores.

redis-py has no trio support: its blocking client runs in worker threads (trio.to_thread), at most
CONNECTIONS at once over a pool of as many connections. Every call is bounded by TIMEOUT (connect,
and each reply), and the call as a whole by CALL_TIMEOUT (a wait for a free thread included):
a Redis that is away never holds a ShouldRateLimit stream longer. Redis Cluster is not supported
(one decision touches several rules' keys).
"""

from __future__ import annotations

import functools
import logging
import math
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import redis
import trio
from redis.backoff import NoBackoff
from redis.retry import Retry

from meshctl.control.ratelimit_counters import (
    HISTORY_SECONDS,
    QUOTA_SHARE,
    CallerGrants,
    CountersUnavailable,
    GlobalRule,
    Verdict,
    verdict,
    window_end,
    window_index,
)

log = logging.getLogger("meshctl.control.ratelimit")

SCHEMES = ("redis", "rediss")
TIMEOUT = 0.1  # seconds: connecting, and each reply (the sidecar's own call timeout is 0.1 s too)
CALL_TIMEOUT = 0.25  # seconds: one call as a whole, a wait for a worker thread included
CONNECTIONS = 8  # worker threads and pooled connections
PREFIX = "meshctl:ratelimit:"
HISTORY_REFRESH = 1.0  # seconds between reads of the mesh-wide last minute

# KEYS: per rule, its current window, its previous window, its history second.
# ARGV: hits, QUOTA_SHARE, history expiry (s); per rule: requests, burst, shadow (0/1), the grant
# the caller is due (0: none asked), the current window's expiry (ms).
# Returns: admitted (0/1), and per rule {limit, used, room (0/1), granted}.
DECIDE_SCRIPT = """
local hits, share, history_ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local rules = #KEYS / 3
local limits, shadow, wanted = {}, {}, {}
local admitted = true
for i = 1, rules do
  local base = 3 + (i - 1) * 5
  local requests, burst = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2])
  shadow[i], wanted[i] = ARGV[base + 3] == '1', tonumber(ARGV[base + 4])
  local current = KEYS[(i - 1) * 3 + 1]
  local found = redis.call('HMGET', current, 'carried', 'used')
  local carried, used = tonumber(found[1]), tonumber(found[2])
  if carried == nil then
    -- A new window: what the previous one left unused, at most burst; a quiet (gone) one, burst.
    local previous = redis.call('HMGET', KEYS[(i - 1) * 3 + 2], 'carried', 'used')
    if previous[1] then
      local limit = requests + math.min(burst, tonumber(previous[1]))
      carried = math.min(burst, math.max(0, limit - tonumber(previous[2])))
    else
      carried = burst
    end
    used = 0
    redis.call('HSET', current, 'carried', carried, 'used', 0)
    redis.call('PEXPIRE', current, tonumber(ARGV[base + 5]))
  end
  -- The rule's requests and burst as they are now (a changed limit applies at once).
  limits[i] = requests + math.min(burst, carried)
  if not shadow[i] and used + hits > limits[i] then
    admitted = false
  end
end
local answers = {}
for i = 1, rules do
  local current, history = KEYS[(i - 1) * 3 + 1], KEYS[(i - 1) * 3 + 3]
  local used = tonumber(redis.call('HGET', current, 'used'))
  local room = used + hits <= limits[i]
  if admitted or shadow[i] then
    used = redis.call('HINCRBY', current, 'used', hits)
  end
  local passed = admitted
  if shadow[i] then
    passed = room
  end
  local granted = 0
  if admitted and not shadow[i] and wanted[i] > 0 then
    local left = limits[i] - used
    granted = math.min(wanted[i], math.floor(left / share), left)
    if granted > 0 then
      used = redis.call('HINCRBY', current, 'used', granted)
    else
      granted = 0
    end
  end
  if passed then
    redis.call('HINCRBY', history, 'allowed', hits + granted)
  else
    redis.call('HINCRBY', history, 'limited', hits)
  end
  redis.call('EXPIRE', history, history_ttl)
  answers[i] = {limits[i], used, room and 1 or 0, granted}
end
return {admitted and 1 or 0, answers}
"""


def check_url(url: str) -> str:
    """`url` if it is redis://HOST[:PORT][/DB] or rediss://...; else ValueError saying why."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - reading it checks it: ValueError for a port that is no number
    except ValueError as error:
        raise ValueError(f"{url!r}: {error}") from None
    if parts.scheme not in SCHEMES:
        raise ValueError(f"{url!r}: expected memory, redis://HOST:PORT[/DB] or rediss://HOST:PORT[/DB]")
    if not parts.hostname:
        raise ValueError(f"{url!r}: no host")
    database = parts.path.strip("/")
    if database and not database.isdigit():
        raise ValueError(f"{url!r}: the database is a number (redis://HOST:PORT/0), not {database!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"{url!r}: no query or fragment is understood")
    return url


def shown_url(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    shown = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        shown += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, shown, parts.path, "", ""))


# KEYS: per rule, its history seconds (ARGV[1] of them). Returns per rule {allowed, limited}: summed
# in Redis, so the reply stays two numbers a rule however many rules there are.
HISTORY_SCRIPT = """
local seconds = tonumber(ARGV[1])
local totals = {}
for rule = 0, #KEYS / seconds - 1 do
  local allowed, limited = 0, 0
  for second = 1, seconds do
    local found = redis.call('HMGET', KEYS[rule * seconds + second], 'allowed', 'limited')
    allowed = allowed + (tonumber(found[1]) or 0)
    limited = limited + (tonumber(found[2]) or 0)
  end
  totals[rule + 1] = {allowed, limited}
end
return totals
"""


class RedisCounters:
    """The global counters in Redis; rules and callers' grant sizes in this plane's memory.
    `decide_async` is the service's call; `follow_history` keeps the last-minute view that
    `last_minute` answers from (refreshed every HISTORY_REFRESH, so the API stays sync)."""

    def __init__(self, url: str, *, prefix: str = PREFIX, connections: int = CONNECTIONS) -> None:
        self.url = check_url(url)
        self.prefix = prefix
        # No retry inside redis-py: the sidecar waits 0.1 s at most, a retry would answer nobody.
        self._pool = redis.BlockingConnectionPool.from_url(
            url, max_connections=connections, timeout=TIMEOUT, socket_timeout=TIMEOUT,
            socket_connect_timeout=TIMEOUT, retry=Retry(NoBackoff(), 0), health_check_interval=0,
        )  # fmt: skip
        self._client = redis.Redis(connection_pool=self._pool)
        self._decide = self._client.register_script(DECIDE_SCRIPT)
        self._read_history = self._client.register_script(HISTORY_SCRIPT)
        self._limiter = trio.CapacityLimiter(connections)
        self._rules: dict[str, GlobalRule] = {}
        self._grants = CallerGrants()
        self._history: dict[str, tuple[int, int]] = {}
        self._next_sweep = 0.0
        self.unknown_descriptors = 0
        self.unavailable = 0  # decisions Redis did not answer (answered UNAVAILABLE)
        self.counters_capped = 0  # never: keys expire on their own (Redis' maxmemory is the operator's)

    # --- rules ------------------------------------------------------------------------------

    def set_rules(self, rules: Iterable[GlobalRule]) -> None:
        """Replace the rules. A changed limit applies to the current window at once (the script
        takes requests and burst per call); a changed unit counts in other keys, afresh."""
        new = {rule.name: rule for rule in rules}
        self._grants.forget(name for name, old in self._rules.items()
                            if name not in new or new[name].unit_seconds != old.unit_seconds)  # fmt: skip
        self._rules = new
        self._history = {name: totals for name, totals in self._history.items() if name in new}

    def rule(self, name: str) -> GlobalRule | None:
        return self._rules.get(name)

    @property
    def rules(self) -> Mapping[str, GlobalRule]:
        return self._rules

    def statistics(self) -> dict[str, int]:
        return {
            "rules": len(self._rules),
            "counters_capped": self.counters_capped,
            "unknown_descriptors": self.unknown_descriptors,
            "store_unavailable": self.unavailable,
        }

    # --- deciding ---------------------------------------------------------------------------

    async def decide_async(
        self, names: Sequence[str | None], hits: int, now: float, caller: str = "", want_quota: bool = False
    ) -> list[Verdict]:
        """As GlobalCounters.decide, counted in Redis; CountersUnavailable if it does not answer."""
        hits = hits or 1
        if now >= self._next_sweep:
            self._grants.sweep(now)
            self._next_sweep = now + 1.0
        rules = [self._rules.get(name) if name is not None else None for name in names]
        self.unknown_descriptors += sum(rule is None for rule in rules)
        verdicts = [Verdict(rule, True) for rule in rules]
        known = [(position, rule, window_index(rule, now)) for position, rule in enumerate(rules) if rule is not None]
        if not known:
            return verdicts  # nothing to count: no round trip
        keys: list[str] = []
        args: list[int | float] = [hits, QUOTA_SHARE, HISTORY_SECONDS + 1]
        second = int(now)
        for _, rule, index in known:
            keys += [self._window_key(rule, index), self._window_key(rule, index - 1), self._history_key(rule.name, second)]
            wanted = self._grants.wanted(caller, rule.name, index, now) if want_quota and not rule.shadow else 0
            # Expires two windows after its own starts: the next window reads what it left unused.
            expiry_ms = max(1, math.ceil(((index + 2) * rule.unit_seconds - now) * 1000))
            args += [rule.requests, rule.burst, int(rule.shadow), wanted, expiry_ms]
        try:
            admitted, answers = await self._call(functools.partial(self._decide, keys, args))
        except CountersUnavailable:
            self.unavailable += 1
            raise
        for (position, rule, index), (limit, used, room, granted) in zip(known, answers):
            end = window_end(rule, index)
            found = verdict(rule, room=bool(room), admitted=bool(admitted), limit=int(limit), used=int(used),
                            end=end, now=now, want_quota=want_quota, granted=int(granted))  # fmt: skip
            if found.quota is not None and found.quota.requests > 0:
                self._grants.record(caller, rule.name, index, found.quota, now, end)
            verdicts[position] = found
        return verdicts

    def _window_key(self, rule: GlobalRule, index: int) -> str:
        return f"{self.prefix}window:{rule.name}:{rule.unit_seconds}:{index}"

    def _history_key(self, name: str, second: int) -> str:
        return f"{self.prefix}history:{name}:{second}"

    async def _call(self, function: Callable[[], Any]) -> Any:
        """`function` (blocking redis-py) in a worker thread, within CALL_TIMEOUT."""
        try:
            with trio.fail_after(CALL_TIMEOUT):
                # abandon_on_cancel: a thread stuck past the deadline finishes on its own (its
                # socket timeout ends it) and keeps its limiter token till then: still bounded.
                return await trio.to_thread.run_sync(function, limiter=self._limiter, abandon_on_cancel=True)
        except trio.TooSlowError:
            raise CountersUnavailable(f"Redis at {shown_url(self.url)} did not answer within {CALL_TIMEOUT}s") from None
        except redis.RedisError as error:
            raise CountersUnavailable(f"Redis at {shown_url(self.url)}: {error}") from None

    # --- reporting --------------------------------------------------------------------------

    def last_minute(self, name: str, now: float) -> tuple[int, int]:
        """(allowed, limited) mesh-wide over the last minute, as last read (follow_history)."""
        del now  # the view is the one follow_history read last
        return self._history.get(name, (0, 0))

    async def read_history(self, now: float) -> None:
        """Read every rule's last minute from Redis (one script, one round trip)."""
        names = list(self._rules)
        if not names:
            self._history = {}
            return
        seconds = range(int(now) - HISTORY_SECONDS + 1, int(now) + 1)
        keys = [self._history_key(name, second) for name in names for second in seconds]
        totals = await self._call(functools.partial(self._read_history, keys, [len(seconds)]))
        self._history = {name: (int(allowed), int(limited)) for name, (allowed, limited) in zip(names, totals)}

    async def follow_history(
        self, clock: Callable[[], float] = time.time, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Keep the last-minute view fresh; say once when Redis goes away and when it is back."""
        task_status.started()
        away = False
        while True:
            try:
                await self.read_history(clock())
                if away:
                    log.warning("rate limit counters: Redis at %s answers again", shown_url(self.url))
                away = False
            except CountersUnavailable as error:
                if not away:
                    log.warning("rate limit counters: %s; global rules answer UNAVAILABLE (each sidecar's "
                                "failure mode applies) until it is back", error)  # fmt: skip
                away = True
            await trio.sleep(HISTORY_REFRESH)
