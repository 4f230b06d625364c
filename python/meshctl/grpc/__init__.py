"""gRPC over HTTP/2 on trio (h2, sans-IO): just enough for bidirectional streaming calls such as ADS."""

from meshctl.grpc.client import GrpcChannel, open_grpc_channel
from meshctl.grpc.limits import Limits
from meshctl.grpc.server import serve_grpc
from meshctl.grpc.status import GrpcError, StatusCode
from meshctl.grpc.stream import GrpcStream

__all__ = [
    "GrpcChannel",
    "GrpcError",
    "GrpcStream",
    "Limits",
    "StatusCode",
    "open_grpc_channel",
    "serve_grpc",
]
