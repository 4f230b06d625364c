"""Global rate limit counters shared through a real redis-server (`meshctl serve --ratelimit-store
redis://...`): two `meshctl serve` planes on one etcd store and one Redis count one limit and each
shows the mesh-wide last minute; Redis going away makes a plane answer UNAVAILABLE within its
timeout (the sidecar's failure mode then applies) and coming back makes it count again; a Redis
that accepts but never answers holds no call past its bound; bad URLs are refused by flag.
The arithmetic shared with the memory store is tested on both in tests/test_ratelimit_counters.py."""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import trio
from envoy.service.ratelimit.v3 import rls_pb2
from helpers.control_plane import start_control_plane
from helpers.envoy_client_sidecar import workload_certificate
from helpers.etcd_cluster import start_cluster
from helpers.mesh import apply
from helpers.redis_server import REDIS_SERVER, start_redis
from meshctl.control.ratelimit_counters import CountersUnavailable, GlobalRule
from meshctl.control.ratelimit_redis import CALL_TIMEOUT, RedisCounters, check_url
from test_rate_limit_service import (
    Client,
    away_from_window_end,
    global_limit,
    last_minute,
    wait_for_rule,
)

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server not installed (Debian redis-server)")

OK, OVER_LIMIT = rls_pb2.RateLimitResponse.OK, rls_pb2.RateLimitResponse.OVER_LIMIT


@pytest.mark.parametrize(
    ("url", "why"),
    [("memcached://127.0.0.1:11211", "expected memory, redis://"), ("redis://", "no host"),
     ("redis://127.0.0.1:notaport/0", "Port could not be cast"), ("redis://127.0.0.1:6379/zero", "is a number"),
     ("redis://127.0.0.1:6379/0?ssl=true", "no query")],
)  # fmt: skip
def test_bad_urls_are_refused_naming_the_flag(url: str, why: str, tmp_path: Path):
    with pytest.raises(ValueError, match=why):
        check_url(url)
    shown = subprocess.run([sys.executable, "-m", "meshctl", "serve", "--ratelimit-store", url, "--api-port", "0",
                            "--xds-port", "0"], check=False, capture_output=True, text=True, timeout=30,
                           env={"XDG_DATA_HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "COLUMNS": "300"})  # fmt: skip
    assert shown.returncode == 2 and "--ratelimit-store" in shown.stderr and why in shown.stderr, shown.stderr
    assert not (tmp_path / "meshctl").exists()  # refused before anything was made


async def test_a_redis_that_never_answers_holds_no_decision_past_its_bound():
    """A listener that accepts and reads but never replies (a Redis hung, or a black hole)."""
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, _swallow, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        counters = RedisCounters(f"redis://127.0.0.1:{port}/0")
        counters.set_rules([GlobalRule("r", 10, 60)])
        for _ in range(3):
            started = time.monotonic()
            with pytest.raises(CountersUnavailable, match=f"127.0.0.1:{port}"):
                await counters.decide_async(["r"], 0, time.time(), "a", want_quota=True)
            assert time.monotonic() - started < CALL_TIMEOUT + 0.15
        assert counters.unavailable == 3
        # A descriptor no rule names needs no counter: answered without Redis.
        assert (await counters.decide_async(["unknown"], 0, time.time()))[0].ok
        nursery.cancel_scope.cancel()


async def _swallow(stream: trio.SocketStream) -> None:
    while await stream.receive_some():
        pass


@pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd not installed (Debian etcd-server)")
def test_two_planes_on_one_redis_count_one_limit_and_answer_unavailable_while_it_is_away(tmp_path: Path):
    cluster = start_cluster(tmp_path / "etcd", size=1)  # the planes share it; no member fails here
    redis_server = start_redis(tmp_path / "redis")
    planes, clients = [], []
    try:
        for name in ("a", "b"):
            planes.append(start_control_plane(tmp_path / name, "--store", cluster.url("rl"),
                                              "--ratelimit-store", redis_server.url))  # fmt: skip
        certs = workload_certificate(planes[0], "productpage", tmp_path / "certs")
        clients = [Client(plane, certs) for plane in planes]
        apply(planes[0], global_limit(6, "hour", name="six-an-hour"))
        for plane in planes:
            wait_for_rule(plane, "six-an-hour", "6 per hour")
        away_from_window_end(3600, 30)
        # Alternating planes: one count. Memory counters would admit 6 on each.
        answers = [clients[n % 2].ask("default/six-an-hour/0") for n in range(10)]
        assert [a.overall_code for a in answers] == [OK] * 6 + [OVER_LIMIT] * 4
        assert [a.statuses[0].limit_remaining for a in answers] == [5, 4, 3, 2, 1, 0, 0, 0, 0, 0]
        # Each plane shows the mesh-wide last minute (read from Redis every second).
        for plane in planes:
            deadline = time.monotonic() + 5
            while (shown := last_minute(plane, "six-an-hour")[0])["allowedLastMinute"] != 6:
                assert time.monotonic() < deadline, shown
                time.sleep(0.2)
            assert shown == {"rule": 0, "serving": "6 per hour", "allowedLastMinute": 6, "limitedLastMinute": 4}

        redis_server.stop()
        for client in clients:
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as refused:
                client.ask("default/six-an-hour/0")
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
            assert "rate limit counters are unreachable" in refused.value.details()
            assert time.monotonic() - started < 1.0
        # The API still answers (with the last view it read).
        assert last_minute(planes[1], "six-an-hour")[0]["serving"] == "6 per hour"

        # Back (empty: Redis here keeps nothing on disk): counting starts again.
        redis_server = start_redis(tmp_path / "redis-again", port=redis_server.port)
        deadline = time.monotonic() + 5
        while True:
            try:
                assert clients[1].ask("default/six-an-hour/0").overall_code == OK
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline, "no answer after Redis came back"
                time.sleep(0.1)
        assert "Redis at redis://127.0.0.1" in planes[1].log()
    except BaseException:
        for plane in planes:
            print(f"--- plane ---\n{plane.log()[-3000:]}")
        print(f"--- redis ---\n{redis_server.log()[-2000:]}")
        raise
    finally:
        for client in clients:
            client.close()
        for plane in planes:
            plane.stop()
        redis_server.stop()
        cluster.stop()
