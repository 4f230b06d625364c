"""Live route reconfiguration of an in-process Engine under load (meshctl only)."""

from __future__ import annotations

import importlib
import random
import threading
import time

import pytest

from helpers.bootstrap import bootstrap, cluster, listener, http_connection_manager, route_configuration, virtual_host, weighted_route
from helpers.http_client import LoadResult, run_load
from helpers.ports import free_port, port_accepts

pytestmark = pytest.mark.meshctl_only

ROUTE_NAME = "dynamic"


def route_bytes(weights: dict[str, int], route_extra: dict | None = None) -> bytes:
    from meshctl.agent.bootstrap import resource_to_bytes

    core = importlib.import_module("meshctl._core")
    route = weighted_route(weights)
    route.update(route_extra or {})
    config = route_configuration(ROUTE_NAME, [virtual_host("all", [route])])
    return resource_to_bytes(core.ROUTE_CONFIGURATION_TYPE, config)


@pytest.fixture
def engine(echo_a, echo_b):
    """An Engine whose listener takes its routes over RDS; tests feed them with Engine.apply."""
    from meshctl.agent.bootstrap import bootstrap_from_dict

    core = importlib.import_module("meshctl._core")
    port = free_port()
    config = bootstrap(
        [listener("http", port, [{"filters": [http_connection_manager(rds_name=ROUTE_NAME)]}])],
        [cluster("a", echo_a.port), cluster("b", echo_b.port)],
    )
    running = core.Engine(bootstrap_from_dict(config), worker_threads=1)
    try:
        running.apply(core.ROUTE_CONFIGURATION_TYPE, [route_bytes({"a": 100, "b": 0})])
        deadline = time.monotonic() + 10
        while not port_accepts(port):
            assert time.monotonic() < deadline, "engine listener never accepted"
            time.sleep(0.05)
        yield core, running, port
    finally:
        running.stop()


def load_in_background(port: int, seconds: float, concurrency: int = 4) -> tuple[threading.Thread, LoadResult]:
    holder: dict[str, LoadResult] = {}
    thread = threading.Thread(
        target=lambda: holder.setdefault("result", run_load(port, duration=seconds, concurrency=concurrency))
    )
    thread.start()
    return thread, holder  # type: ignore[return-value]


def test_fifty_weight_changes_under_load(engine):
    core, running, port = engine
    rng = random.Random(1234)
    thread, holder = load_in_background(port, seconds=10.0)
    started = time.monotonic()
    for change in range(50):
        if change == 49:
            weights = {"a": 20, "b": 80}
        else:
            first = rng.randint(0, 100)
            weights = {"a": first, "b": 100 - first}
        running.apply(core.ROUTE_CONFIGURATION_TYPE, [route_bytes(weights)])
        # Spread the 50 changes over ~9 s of the 10 s load.
        time.sleep(max(0.0, started + 0.18 * (change + 1) - time.monotonic()))
    thread.join(60)
    during = holder["result"]
    assert during.total > 500, f"load too small to mean anything: {during.total} requests"
    assert during.failures == [], f"{len(during.failures)} failed of {during.total}: {during.failures[:10]}"

    after = run_load(port, total=4000, concurrency=4)
    assert after.failures == [], after.failures[:10]
    assert abs(after.share("a") - 20) <= 3 and abs(after.share("b") - 80) <= 3, (
        f"split {after.share('a'):.1f}/{after.share('b'):.1f} after the last change to 20/80"
    )


@pytest.mark.parametrize(
    "route_extra, weights, field",
    [
        ({"match": {"safe_regex": {"regex": "^/(unclosed"}}}, {"a": 50, "b": 50}, "regex"),
        ({}, {"a": 0, "b": 0}, "weight"),
    ],
    ids=["bad-regex", "zero-weights"],
)
def test_invalid_route_configuration_is_refused_and_traffic_continues(engine, route_extra, weights, field):
    core, running, port = engine
    thread, holder = load_in_background(port, seconds=2.0, concurrency=2)
    time.sleep(0.5)
    with pytest.raises(core.ConfigError) as refused:
        running.apply(core.ROUTE_CONFIGURATION_TYPE, [route_bytes(weights, route_extra)])
    message = str(refused.value)
    assert field in message.lower(), f"ConfigError does not name {field!r}: {message}"
    assert ROUTE_NAME in message, f"ConfigError does not name the RouteConfiguration: {message}"
    thread.join(30)
    during = holder["result"]
    assert during.failures == [], during.failures[:10]
    # The old routes (100/0) are still in force.
    after = run_load(port, total=300, concurrency=2)
    assert after.failures == [] and after.by_upstream == {"a": 300}, (after.by_upstream, after.failures[:5])
