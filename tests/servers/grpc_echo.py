"""grpcio upstream with raw-bytes generic handlers: unary, server/client streaming, bidi and a slow method."""

from __future__ import annotations

import argparse
import time
from concurrent import futures

import grpc

SERVICE = "meshtest.Echo"


def identity(data: bytes) -> bytes:
    return data


class Echo:
    """Behaviour is steered by request metadata so one server covers every status-code case."""

    def __init__(self, name: str) -> None:
        self.name = name

    def _finish(self, context: grpc.ServicerContext) -> None:
        """Set trailing metadata and, if asked through `x-want-code`, end with that status."""
        metadata = dict(context.invocation_metadata())
        trailers = [("x-upstream", self.name), ("x-trailer-bin", b"\x00\x01\xfe\xff")]
        if "x-echo" in metadata:
            trailers.append(("x-echo-back", metadata["x-echo"]))
        context.set_trailing_metadata(trailers)
        code_name = metadata.get("x-want-code")
        if code_name:
            # Non-ASCII and '%' make grpc-message percent-encoding visible to the proxy under test.
            context.abort(grpc.StatusCode[code_name], metadata.get("x-want-details", "") + " ✓ 100%")

    def unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._finish(context)
        return self.name.encode() + b"|" + request

    def server_stream(self, request: bytes, context: grpc.ServicerContext):
        # The request is the number of messages to send.
        for index in range(int(request)):
            yield b"%d" % index
        self._finish(context)

    def client_stream(self, requests, context: grpc.ServicerContext) -> bytes:
        received = list(requests)
        self._finish(context)
        return b"%d:" % len(received) + b",".join(received)

    def bidi(self, requests, context: grpc.ServicerContext):
        for message in requests:
            yield b"echo:" + message
        self._finish(context)

    def sleep(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        # Sleep in small steps so a cancelled call (deadline passed) frees the worker soon.
        deadline = time.monotonic() + float(request)
        while time.monotonic() < deadline and context.is_active():
            time.sleep(0.02)
        self._finish(context)
        return b"slept"


def build_server(name: str, host: str, port: int) -> tuple[grpc.Server, int]:
    echo = Echo(name)
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(echo.unary, identity, identity),
        "ServerStream": grpc.unary_stream_rpc_method_handler(echo.server_stream, identity, identity),
        "ClientStream": grpc.stream_unary_rpc_method_handler(echo.client_stream, identity, identity),
        "Bidi": grpc.stream_stream_rpc_method_handler(echo.bidi, identity, identity),
        "Sleep": grpc.unary_unary_rpc_method_handler(echo.sleep, identity, identity),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    bound = server.add_insecure_port(f"{host}:{port}")
    return server, bound


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    grpc_server, bound_port = build_server(args.name, args.host, args.port)
    grpc_server.start()
    print(f"READY {bound_port}", flush=True)
    try:
        grpc_server.wait_for_termination()
    except KeyboardInterrupt:
        grpc_server.stop(0)
