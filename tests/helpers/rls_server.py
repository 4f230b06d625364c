"""A real gRPC rate limit service (envoy.service.ratelimit.v3, grpcio) for the global rate limit
tests: a fixed limit per (domain, descriptor) in a window, every call recorded, and optionally
meshctl's quota grants, a delay, or headers for the request and response."""

from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

Descriptor = tuple[tuple[str, str], ...]


@dataclass
class Call:
    domain: str
    descriptors: list[Descriptor]
    hits_addend: int
    metadata: dict[str, str]


@dataclass
class RlsServer(rls_pb2_grpc.RateLimitServiceServicer):
    """`limit` requests per descriptor; `quota`: grant up to that many more (already counted) to
    callers that send x-meshctl-quota, valid for `quota_seconds`."""

    limit: int
    quota: int = 0
    quota_seconds: float = 30.0
    delay: float = 0.0
    response_headers: list[tuple[str, str]] = field(default_factory=list)
    request_headers: list[tuple[str, str]] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    counts: dict[tuple[str, Descriptor], int] = field(default_factory=dict)
    # (private key PEM, certificate chain PEM): serve over TLS (h2 by ALPN) instead of h2c.
    tls: tuple[bytes, bytes] | None = None
    port: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        rls_pb2_grpc.add_RateLimitServiceServicer_to_server(self, self._server)
        if self.tls is None:
            self.port = self._server.add_insecure_port("127.0.0.1:0")
        else:
            self.port = self._server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([self.tls]))
        self._server.start()

    def stop(self) -> None:
        self._server.stop(grace=None)

    def ShouldRateLimit(self, request, context):  # noqa: N802 (gRPC's method name)
        if self.delay:
            time.sleep(self.delay)
        metadata = {key: value for key, value in context.invocation_metadata()}
        descriptors = [tuple((e.key, e.value) for e in d.entries) for d in request.descriptors]
        wants_quota = self.quota > 0 and metadata.get("x-meshctl-quota") == "1"
        hits = request.hits_addend or 1
        response = rls_pb2.RateLimitResponse()
        over = False
        with self._lock:
            self.calls.append(Call(request.domain, descriptors, request.hits_addend, metadata))
            for descriptor in descriptors:
                key = (request.domain, descriptor)
                used = self.counts.get(key, 0) + hits
                status = response.statuses.add()
                if used > self.limit:
                    status.code = rls_pb2.RateLimitResponse.OVER_LIMIT
                    over = True
                    continue
                self.counts[key] = used
                status.code = rls_pb2.RateLimitResponse.OK
                status.limit_remaining = self.limit - used
                if wants_quota and self.limit - used > 0:
                    granted = min(self.quota, self.limit - used)
                    self.counts[key] = used + granted
                    status.quota.requests = granted
                    status.quota.valid_until.FromMilliseconds(int((time.time() + self.quota_seconds) * 1000))
        response.overall_code = rls_pb2.RateLimitResponse.OVER_LIMIT if over else rls_pb2.RateLimitResponse.OK
        for key, value in self.response_headers:
            response.response_headers_to_add.append(base_pb2.HeaderValue(key=key, value=value))
        for key, value in self.request_headers:
            response.request_headers_to_add.append(base_pb2.HeaderValue(key=key, value=value))
        return response

    def seen(self) -> list[Call]:
        with self._lock:
            return list(self.calls)
