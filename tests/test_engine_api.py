"""The engine through its Python API: listener add/remove while others serve, HTTP/2 upstream
multiplexing, empty clusters, endpoints from EDS, and the counters an operator reads (meshctl only)."""

from __future__ import annotations

import concurrent.futures
import json
import re
import socket
import subprocess

import pytest

from helpers import bootstrap as b
from helpers.http_client import Http1Client
from helpers.ports import free_port

pytestmark = pytest.mark.meshctl_only


def counter(stats: str, name: str, **labels: str) -> int:
    label_text = ",".join(f'{key}="{value}"' for key, value in labels.items())
    match = re.search(rf"^{re.escape(name)}{{{re.escape(label_text)}}} (\d+)$", stats, re.M)
    assert match, f"{name}{{{label_text}}} not in stats"
    return int(match.group(1))


@pytest.fixture
def core():
    import meshctl._core

    return meshctl._core


@pytest.fixture
def start_engine(core):
    from meshctl.agent.bootstrap import bootstrap_from_dict

    engines = []

    def start(config: dict):
        engine = core.Engine(bootstrap_from_dict(config), worker_threads=1)
        engines.append(engine)
        return engine

    yield start
    for engine in engines:
        engine.stop()


def to_bytes(type_url: str, resource: dict) -> bytes:
    from meshctl.agent.bootstrap import resource_to_bytes

    return resource_to_bytes(type_url, resource)


def test_adding_and_removing_a_listener_leaves_the_others_alone(core, start_engine, echo_a, echo_b):
    first_port, second_port = free_port(), free_port()
    routes_a = b.route_configuration("a", [b.virtual_host("all", [b.route("a")])])
    engine = start_engine(b.bootstrap([b.http_listener("first", first_port, routes_a)], [b.cluster("a", echo_a.port), b.cluster("b", echo_b.port)]))
    kept_alive = Http1Client(first_port)
    assert kept_alive.get("/before").json()["name"] == "a"

    routes_b = b.route_configuration("b", [b.virtual_host("all", [b.route("b")])])
    engine.apply(core.LISTENER_TYPE, [to_bytes(core.LISTENER_TYPE, b.http_listener("second", second_port, routes_b))])
    assert Http1Client(second_port).get("/new").json()["name"] == "b"
    # The first listener's open connection was not touched by the addition...
    assert kept_alive.get("/during").json()["name"] == "a"

    engine.remove(core.LISTENER_TYPE, ["second"])
    # ...nor by the removal; the removed listener refuses new connections.
    assert kept_alive.get("/after").json()["name"] == "a"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", second_port), timeout=2).close()
    assert set(engine.listener_addresses()) == {"first"}


def test_a_refused_listener_changes_nothing(core, start_engine, echo_a):
    port = free_port()
    routes = b.route_configuration("a", [b.virtual_host("all", [b.route("a")])])
    engine = start_engine(b.bootstrap([b.http_listener("first", port, routes)], [b.cluster("a", echo_a.port)]))
    broken = b.http_listener("first", port, b.route_configuration("a", [b.virtual_host("all", [b.route("missing")])]))
    with pytest.raises(core.ConfigError, match=r'Listener "first".*route_config.*cluster "missing" is not defined'):
        engine.apply(core.LISTENER_TYPE, [to_bytes(core.LISTENER_TYPE, broken)])
    assert Http1Client(port).get("/still").json()["name"] == "a"
    stats = engine.stats_prometheus()
    assert counter(stats, "meshctl_config_reject_total", type="Listener") == 1


def test_http2_upstream_multiplexes_on_one_connection(core, start_engine, echo_a):
    port = free_port()
    routes = b.route_configuration("a", [b.virtual_host("all", [b.route("a")])])
    engine = start_engine(b.bootstrap([b.http_listener("h", port, routes)], [b.cluster("a", echo_a.port, http2=True)]))

    def fetch(i: int) -> list[str]:
        client = Http1Client(port)
        try:
            return [client.get(f"/multiplexed/{i}/{n}").json()["name"] for n in range(2)]
        finally:
            client.close()

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(fetch, range(64)))
    assert results == [["a", "a"]] * 64
    stats = engine.stats_prometheus()
    assert counter(stats, "meshctl_upstream_rq_total", cluster="a") == 128
    # 128 requests from 64 downstream connections shared one upstream HTTP/2 connection.
    assert counter(stats, "meshctl_upstream_cx_total", cluster="a") == 1


def test_an_empty_cluster_answers_503_naming_it(core, start_engine):
    port = free_port()
    empty = {"name": "nobody-home", "type": "EDS", "connect_timeout": "1s", "eds_cluster_config": {"eds_config": {"ads": {}}}}
    routes = b.route_configuration("r", [b.virtual_host("all", [b.route("nobody-home")])])
    engine = start_engine(b.bootstrap([b.http_listener("h", port, routes)], [empty]))
    response = Http1Client(port).get("/")
    assert response.status == 503
    assert b'"nobody-home"' in response.body
    # Counted against the cluster, so error rates (meshctl route shift) see it.
    stats = engine.stats_prometheus()
    assert 'meshctl_upstream_rs_total{cluster="nobody-home",code_class="5xx"} 1' in stats


def test_endpoints_arrive_through_eds(core, start_engine, echo_a, echo_b):
    port = free_port()
    eds = {"name": "svc", "type": "EDS", "connect_timeout": "1s", "eds_cluster_config": {"eds_config": {"ads": {}}}}
    routes = b.route_configuration("r", [b.virtual_host("all", [b.route("svc")])])
    engine = start_engine(b.bootstrap([b.http_listener("h", port, routes)], [eds]))
    assert Http1Client(port).get("/").status == 503

    def assignment(*ports: int) -> bytes:
        endpoints = [{"endpoint": {"address": b.socket_address(p)}} for p in ports]
        return to_bytes(core.CLUSTER_LOAD_ASSIGNMENT_TYPE, {"cluster_name": "svc", "endpoints": [{"lb_endpoints": endpoints}]})

    engine.apply(core.CLUSTER_LOAD_ASSIGNMENT_TYPE, [assignment(echo_a.port, echo_b.port)])
    client = Http1Client(port)
    seen = {client.get(f"/{i}").json()["name"] for i in range(20)}
    assert seen == {"a", "b"}, "round robin should reach both endpoints"
    engine.apply(core.CLUSTER_LOAD_ASSIGNMENT_TYPE, [assignment(echo_b.port)])
    assert {client.get(f"/{i}").json()["name"] for i in range(10)} == {"b"}
    dump = json.loads(engine.config_dump())
    assert dump["clusters"][0]["endpoints"] == [{"address": f"127.0.0.1:{echo_b.port}", "weight": 1}]


def test_protocol_fallbacks_are_counted(core, start_engine, line_upstream, echo_a):
    port = free_port()
    routes = b.route_configuration("r", [b.virtual_host("all", [b.route("a")])])
    listener = b.listener(
        "mixed",
        port,
        [{"filter_chain_match": {"application_protocols": ["http/1.1", "h2c"]}, "filters": [b.http_connection_manager(routes)]}],
        default_filter_chain={"filters": [b.tcp_proxy("lines")]},
    )
    engine = start_engine(b.bootstrap([listener], [b.cluster("a", echo_a.port), b.cluster("lines", line_upstream.port)]))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        assert sock.makefile("rb").readline().startswith(b"HELLO")
    assert Http1Client(port).get("/").json()["name"] == "a"
    stats = engine.stats_prometheus()
    assert counter(stats, "meshctl_protocol_detection_fallback_total", listener="mixed") == 1
    assert counter(stats, "meshctl_downstream_cx_total", listener="mixed") == 2


def test_stats_and_dump_never_show_key_material(core, start_engine, echo_a, tmp_path):
    from test_tls_and_limits import tls_proxy, write_self_signed

    port = free_port()
    cert, key = write_self_signed(tmp_path)
    engine = start_engine(tls_proxy(port, echo_a.port, cert, key))
    key_body = key.read_text().split("-----")[2].strip().splitlines()[0]
    assert key_body not in engine.config_dump()
    assert key_body not in engine.stats_prometheus()
    assert str(cert) in engine.config_dump()
    subprocess.run(["curl", "-sk", "-o", "/dev/null", f"https://127.0.0.1:{port}/"], timeout=20, check=True)
