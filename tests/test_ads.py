"""The xDS transport: meshctl.grpc on its own and against grpcio, the ADS server's versions, nonces,
ordering and ACK/NACK bookkeeping, and the sidecar agent and a real Envoy following one control plane
through updates, a refused config and a control-plane restart."""

from __future__ import annotations

import functools
from concurrent import futures

import grpc
import pytest
import trio
from ads_helpers.mesh_config import mesh_snapshot
from ads_helpers.probe import ADS_METHOD, AdsProbe
from ads_helpers.running import (
    RunningServer,
    bounded,
    start_envoy,
    upstream_names,
    wait_for_upstream,
)
from helpers.ports import free_port

from meshctl.agent.ads_client import AdsClient
from meshctl.agent.backoff import Backoff
from meshctl.control import resource_types as types
from meshctl.control.snapshot import SnapshotCache
from meshctl.grpc import GrpcError, Limits, StatusCode, open_grpc_channel, serve_grpc

ECHO = "/test.Echo/Echo"


async def reverse_echo(stream) -> None:
    while (message := await stream.receive_message()) is not None:
        await stream.send_message(message[::-1])


@bounded(15)
async def test_grpc_streams_through_small_windows_and_enforces_limits(nursery):
    # 64 KiB windows make a 3 MB message cross many WINDOW_UPDATEs in both directions.
    limits = Limits(max_message_bytes=4_000_000, stream_window=65535, max_concurrent_streams=4)
    host, port = await nursery.start(functools.partial(serve_grpc, limits=limits), {ECHO: reverse_echo}, "127.0.0.1", 0)
    async with open_grpc_channel(host, port, limits=limits) as channel:
        async with channel.open_stream(ECHO) as stream:
            big = bytes(range(256)) * 12_000
            for payload in (b"", b"abc", big):
                await stream.send_message(payload)
                assert await stream.receive_message() == payload[::-1]
            await stream.close_sending()
            assert await stream.receive_message() is None  # trailers said OK
        async with channel.open_stream("/test.Echo/Missing") as stream:
            with pytest.raises(GrpcError) as missing:
                await stream.receive_message()
            assert missing.value.code == StatusCode.UNIMPLEMENTED
        async with channel.open_stream(ECHO) as stream:
            with pytest.raises(GrpcError) as too_big:
                await stream.send_message(b"x" * 4_000_001)
                await stream.receive_message()
            assert too_big.value.code == StatusCode.RESOURCE_EXHAUSTED
            assert "exceeds the limit of 4000000 bytes" in too_big.value.message
        # The connection outlived both failed calls.
        async with channel.open_stream(ECHO) as stream:
            await stream.send_message(b"still here")
            assert await stream.receive_message() == b"ereh llits"


@bounded(15)
async def test_grpcio_calls_our_server(nursery):
    host, port = await nursery.start(serve_grpc, {ECHO: reverse_echo}, "127.0.0.1", 0)

    def call() -> tuple[list[bytes], grpc.StatusCode]:
        with grpc.insecure_channel(f"{host}:{port}") as channel:
            replies = list(channel.stream_stream(ECHO)(iter([b"one", b"two" * 100_000]), timeout=10))
            try:
                list(channel.stream_stream("/test.Echo/Missing")(iter([b"x"]), timeout=10))
            except grpc.RpcError as error:
                return replies, error.code()
        raise AssertionError("the unknown method succeeded")

    replies, missing = await trio.to_thread.run_sync(call)
    assert replies == [b"eno", b"owt" * 100_000]
    assert missing == grpc.StatusCode.UNIMPLEMENTED


async def test_our_client_calls_grpcio():
    def reply_with_bang(requests, context):
        for message in requests:
            yield message + b"!"

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.method_handlers_generic_handler("test.Echo", {"Echo": grpc.stream_stream_rpc_method_handler(reply_with_bang)})
    server.add_generic_rpc_handlers([handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with trio.fail_after(10):
            async with open_grpc_channel("127.0.0.1", port) as channel:
                async with channel.open_stream(ECHO) as stream:
                    await stream.send_message(b"hi")
                    assert await stream.receive_message() == b"hi!"
                    await stream.send_message(b"y" * 300_000)
                    assert await stream.receive_message() == b"y" * 300_000 + b"!"
                    await stream.close_sending()
                    assert await stream.receive_message() is None
                async with channel.open_stream("/test.Echo/Missing") as stream:
                    await stream.close_sending()
                    with pytest.raises(GrpcError) as missing:
                        await stream.receive_message()
                    assert missing.value.code == StatusCode.UNIMPLEMENTED
    finally:
        server.stop(0)


def test_backoff_doubles_with_jitter_up_to_the_cap_and_resets():
    lowest, highest = Backoff(0.5, 4.0, random_fraction=lambda: 0.0), Backoff(0.5, 4.0, random_fraction=lambda: 1.0)
    assert [lowest.next_delay() for _ in range(6)] == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0]
    assert [highest.next_delay() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    highest.reset()
    assert highest.next_delay() == 0.5


UPSTREAMS = {"a": 1001, "b": 1002}  # never dialled: the protocol test has no data plane


@bounded(20)
async def test_ads_versions_nonces_order_and_ack_nack(nursery):
    cache = SnapshotCache()
    cache.set_snapshot(mesh_snapshot("1", listener_port=1, upstreams=UPSTREAMS, weights={"a": 100, "b": 0}))
    server = await RunningServer(cache).start(nursery)
    async with open_grpc_channel(*server.address) as channel, channel.open_stream(ADS_METHOD) as stream:
        probe = AdsProbe(stream, "node-1")
        await probe.request(types.CLUSTER)
        await probe.request(types.LISTENER)
        cds = await probe.receive()
        assert (cds.type_url, cds.version_info) == (types.CLUSTER, "1")
        assert sorted(types.MESSAGE_TYPES[types.CLUSTER].FromString(r.value).name for r in cds.resources) == ["a", "b"]
        await probe.expect_silence()  # LDS waits until the clusters are answered for

        await probe.request(types.ENDPOINT, ["a"])
        await probe.ack(cds)
        eds = await probe.receive()
        assert (eds.type_url, eds.version_info) == (types.ENDPOINT, "1")
        assert [types.MESSAGE_TYPES[types.ENDPOINT].FromString(r.value).cluster_name for r in eds.resources] == ["a"]
        await probe.expect_silence()  # and LDS waits for EDS too
        await probe.ack(eds, ["a"])
        lds = await probe.receive()
        assert lds.type_url == types.LISTENER
        await probe.ack(lds)
        await probe.request(types.ROUTE, ["mesh-routes"], nonce="")
        rds_1 = await probe.receive()
        assert (rds_1.type_url, rds_1.version_info) == (types.ROUTE, "1")
        await probe.ack(rds_1, ["mesh-routes"])
        nonces = {cds.nonce, eds.nonce, lds.nonce, rds_1.nonce}
        assert len(nonces) == 4, "every response has its own nonce"

        # Only the type that changed is pushed.
        cache.set_snapshot(mesh_snapshot("2", listener_port=1, upstreams=UPSTREAMS, weights={"a": 0, "b": 100}))
        rds_2 = await probe.receive()
        assert (rds_2.type_url, rds_2.version_info) == (types.ROUTE, "2")
        await probe.ack(rds_2, ["mesh-routes"])
        await probe.expect_silence()

        # Clusters, endpoints and routes change together: CDS first, RDS only once CDS and EDS are answered.
        three = {**UPSTREAMS, "c": 1003}
        cache.set_snapshot(mesh_snapshot("3", listener_port=1, upstreams=three, weights={"a": 50, "c": 50}))
        cds_3 = await probe.receive()
        assert (cds_3.type_url, cds_3.version_info, len(cds_3.resources)) == (types.CLUSTER, "3", 3)
        await probe.expect_silence()
        await probe.ack(cds_3)
        eds_3 = await probe.receive()
        assert (eds_3.type_url, eds_3.version_info) == (types.ENDPOINT, "3")
        await probe.ack(eds_3, ["a"])
        rds_3 = await probe.receive()
        assert (rds_3.type_url, rds_3.version_info) == (types.ROUTE, "3")

        # A request answering an old nonce is stale: ignored, even if it says NACK.
        stale_before = server.server.statistics().stale_requests
        await probe.request(types.ROUTE, ["mesh-routes"], version="2", nonce=rds_2.nonce, error="stale")
        await probe.expect_silence()
        assert server.server.statistics().stale_requests == stale_before + 1
        assert cache.status()["node-1"][types.ROUTE] == {"acked_version": "2", "nacked_version": None, "error": None}

        await probe.request(types.ROUTE, ["mesh-routes"], version="2", nonce=rds_3.nonce, error="routes: bad weights")
        await probe.expect_silence()  # a NACK is not answered with the same version again
        status = cache.status()["node-1"]
        assert status[types.ROUTE] == {"acked_version": "2", "nacked_version": "3", "error": "routes: bad weights"}
        assert status[types.CLUSTER] == {"acked_version": "3", "nacked_version": None, "error": None}
        assert status[types.LISTENER]["acked_version"] == "1"

        cache.set_snapshot(mesh_snapshot("4", listener_port=1, upstreams=three, weights={"a": 100}))
        rds_4 = await probe.receive()
        await probe.ack(rds_4, ["mesh-routes"])
        await trio.sleep(0.1)
        assert cache.status()["node-1"][types.ROUTE] == {"acked_version": "4", "nacked_version": None, "error": None}
    server.kill()


@pytest.fixture
def engine():
    from meshctl import _core
    from meshctl.agent.bootstrap import bootstrap_from_dict

    running = _core.Engine(bootstrap_from_dict({}), worker_threads=1)  # no listeners until ADS
    yield running
    running.stop()


@bounded(45)
async def test_sidecar_and_envoy_follow_the_control_plane(nursery, engine, echo_a, echo_b, tmp_path, request):
    with_envoy = "envoy" in request.config.getoption("--dataplane")
    upstreams = {"a": echo_a.port, "b": echo_b.port}
    ports = {"sidecar": free_port(), "envoy": free_port()}
    ads_port = free_port()

    def publish(cache: SnapshotCache, version: str, weights: dict[str, int]) -> None:
        # Same mesh for both nodes; only the port each binds differs (they share this machine).
        for node, port in ports.items():
            cache.set_snapshot(mesh_snapshot(version, listener_port=port, upstreams=upstreams, weights=weights), node)

    cache = SnapshotCache()
    publish(cache, "1", {"a": 100, "b": 0})
    server = await RunningServer(cache).start(nursery, ads_port)
    agent = AdsClient(engine, server.address, "sidecar", backoff=Backoff(0.1, 0.5))
    await nursery.start(agent.run)
    envoy = await start_envoy("envoy", ads_port, ports["envoy"], tmp_path) if with_envoy else None
    planes = [ports["sidecar"]] + ([ports["envoy"]] if envoy else [])
    try:
        for port in planes:
            await wait_for_upstream(port, "a", timeout=10)

        publish(cache, "2", {"a": 0, "b": 100})
        for port in planes:
            await wait_for_upstream(port, "b", timeout=3)

        # Weights summing to 0 are refused: the sidecar NACKs with the engine's reason and keeps v2.
        publish(cache, "3", {"a": 0, "b": 0})
        with trio.fail_after(3):
            while cache.status()["sidecar"][types.ROUTE]["nacked_version"] != "3":
                await trio.sleep(0.05)
        route_status = cache.status()["sidecar"][types.ROUTE]
        assert route_status["acked_version"] == "2"
        assert "weights sum to 0" in route_status["error"]
        assert route_status["error"] == agent.status()[types.ROUTE]["error"]
        for port in planes:
            assert await upstream_names(port) == {"b": 10}

        # The control plane dies: both data planes keep serving their last good config.
        server.kill()
        with trio.fail_after(3):
            while agent.connected:
                await trio.sleep(0.05)
        await trio.sleep(0.5)
        for port in planes:
            assert await upstream_names(port) == {"b": 10}

        # It comes back (state lost, as after a crash) with a new config: both reconnect and take it.
        cache = SnapshotCache()
        publish(cache, "4", {"a": 100, "b": 0})
        server = await RunningServer(cache).start(nursery, ads_port)
        for port in planes:
            await wait_for_upstream(port, "a", timeout=10)
        assert agent.connected and agent.statistics().connects >= 2
        with trio.fail_after(3):
            while not all(
                cache.status().get(node, {}).get(types.ROUTE, {}).get("acked_version") == "4"
                for node in (["sidecar", "envoy"] if envoy else ["sidecar"])
            ):
                await trio.sleep(0.05)
    except BaseException:
        if envoy:
            print(f"--- envoy log ---\n{envoy.log()}")
        raise
    finally:
        if envoy:
            await trio.to_thread.run_sync(envoy.stop)
        server.kill()
