"""grpcio client → sidecar (HTTP/2 cluster) → grpcio server: every call shape, status, details, trailers."""

from __future__ import annotations

import grpc
import pytest

from helpers.bootstrap import simple_proxy

SERVICE = "/meshtest.Echo/"


@pytest.fixture
def channel(dataplane, port, grpc_upstream):
    dataplane(simple_proxy(port, grpc_upstream.port, http2_upstream=True))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as grpc_channel:
        grpc.channel_ready_future(grpc_channel).result(timeout=10)
        yield grpc_channel


def rpc(channel: grpc.Channel, kind: str, method: str):
    # Raw bytes in and out: no generated stubs are needed.
    factory = {
        "unary": channel.unary_unary,
        "server_stream": channel.unary_stream,
        "client_stream": channel.stream_unary,
        "bidi": channel.stream_stream,
    }[kind]
    return factory(SERVICE + method, request_serializer=None, response_deserializer=None)


def trailers(call) -> dict:
    return dict(call.trailing_metadata())


def test_unary_ok_with_trailers(channel):
    response, call = rpc(channel, "unary", "Unary").with_call(
        b"ping", metadata=[("x-echo", "hello")], timeout=10
    )
    assert response == b"g|ping"
    assert call.code() == grpc.StatusCode.OK
    metadata = trailers(call)
    assert metadata["x-upstream"] == "g"
    assert metadata["x-echo-back"] == "hello"
    assert metadata["x-trailer-bin"] == b"\x00\x01\xfe\xff"


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAVAILABLE]
)
def test_unary_error_status_details_and_trailers(channel, code):
    with pytest.raises(grpc.RpcError) as raised:
        rpc(channel, "unary", "Unary")(
            b"x", metadata=[("x-want-code", code.name), ("x-want-details", f"details for {code.name}")], timeout=10
        )
    error = raised.value
    assert error.code() == code
    assert error.details() == f"details for {code.name} ✓ 100%"
    assert dict(error.trailing_metadata())["x-upstream"] == "g"


def test_server_streaming(channel):
    call = rpc(channel, "server_stream", "ServerStream")(b"50", metadata=[("x-echo", "s")], timeout=10)
    assert list(call) == [b"%d" % i for i in range(50)]
    assert call.code() == grpc.StatusCode.OK
    assert trailers(call)["x-echo-back"] == "s"


def test_server_streaming_then_error(channel):
    call = rpc(channel, "server_stream", "ServerStream")(
        b"3", metadata=[("x-want-code", "RESOURCE_EXHAUSTED"), ("x-want-details", "quota")], timeout=10
    )
    received = []
    with pytest.raises(grpc.RpcError) as raised:
        for message in call:
            received.append(message)
    assert received == [b"0", b"1", b"2"]
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert raised.value.details() == "quota ✓ 100%"


def test_client_streaming(channel):
    messages = [b"m%d" % i for i in range(20)]
    response, call = rpc(channel, "client_stream", "ClientStream").with_call(iter(messages), timeout=10)
    assert response == b"20:" + b",".join(messages)
    assert call.code() == grpc.StatusCode.OK
    assert trailers(call)["x-upstream"] == "g"


def test_bidi_streaming_interleaved(channel):
    # Send one message, wait for its echo, then the next: proves the proxy streams both ways
    # instead of buffering either direction.
    import queue

    outbox: queue.Queue = queue.Queue()

    def requests():
        while (item := outbox.get()) is not None:
            yield item

    call = rpc(channel, "bidi", "Bidi")(requests(), metadata=[("x-echo", "b")], timeout=10)
    for index in range(10):
        outbox.put(b"%d" % index)
        assert next(call) == b"echo:%d" % index
    outbox.put(None)
    assert list(call) == []
    assert call.code() == grpc.StatusCode.OK
    assert trailers(call)["x-echo-back"] == "b"


def test_deadline_exceeded(channel):
    with pytest.raises(grpc.RpcError) as raised:
        rpc(channel, "unary", "Sleep")(b"3", timeout=0.5)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The channel stays usable after a deadline.
    assert rpc(channel, "unary", "Unary")(b"after", timeout=10) == b"g|after"


def test_many_concurrent_calls_share_one_connection(channel):
    # 64 unary calls in flight at once on one HTTP/2 connection: each gets its own answer.
    from concurrent.futures import ThreadPoolExecutor

    unary = rpc(channel, "unary", "Unary")
    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(lambda index: unary(b"call-%d" % index, timeout=10), range(64)))
    assert answers == [b"g|call-%d" % index for index in range(64)]


def test_large_messages_both_ways(channel):
    # 1 MiB each way crosses many HTTP/2 frames and flow-control windows.
    blob = bytes(range(256)) * 4096
    assert rpc(channel, "unary", "Unary")(blob, timeout=10) == b"g|" + blob
