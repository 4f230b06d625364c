"""An upstream that fails on purpose, for retry and circuit-breaker tests (HTTP/1.1 and h2c).

Each request names a key and how its first tries fail, in its query string:

  key=K          requests are counted per key (default "-")
  fail=N         the first N requests of key K fail (default 0); later ones answer 200
  how=H          how they fail: an HTTP status (503, 500, 409, 418, ...), `grpc-14` (a trailers-only
                 gRPC response with that grpc-status), `reset` (the connection is closed, HTTP/1.1,
                 or the stream reset, h2, before any response), `refuse` (h2: REFUSED_STREAM),
                 or `hang` (no answer for `hang_ms`, default 10 s)
  delay_ms=D     every answer (failed or not) waits D ms first
  hang_ms=D      how long `hang` holds its request

An answer's body is JSON: the key, which try of it this was, and the request body's length and
SHA-256. `GET /__stats?key=K` (asked directly, not through a proxy) returns what the key received:
its count, each request's body length and SHA-256, its Host, and the most requests it had in
flight at once.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import traceback
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import h11
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import trio

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@dataclass
class KeyStats:
    count: int = 0
    bodies: list[tuple[int, str]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    attempt_headers: list[str | None] = field(default_factory=list)
    retry_headers: list[str | None] = field(default_factory=list)
    # Host (HTTP/1.1) or :authority (h2) of each request: mirrored copies carry "-shadow".
    hosts: list[str | None] = field(default_factory=list)


KEYS: dict[str, KeyStats] = {}


@dataclass
class Plan:
    """What to do with one request: `status` with a JSON body, or a failure `how`."""

    key: str
    attempt: int
    how: str | None  # None: answer 200
    delay: float
    hang: float


def plan_for(target: str, headers: dict[str, str], body: bytes) -> Plan:
    query = parse_qs(urlsplit(target).query)
    key = query.get("key", ["-"])[0]
    stats = KEYS.setdefault(key, KeyStats())
    stats.count += 1
    stats.bodies.append((len(body), hashlib.sha256(body).hexdigest()))
    stats.attempt_headers.append(headers.get("x-envoy-attempt-count"))
    stats.retry_headers.append(headers.get("x-envoy-retry-on"))
    stats.hosts.append(headers.get("host") or headers.get(":authority"))
    failing = stats.count <= int(query.get("fail", ["0"])[0])
    return Plan(
        key=key,
        attempt=stats.count,
        how=query.get("how", ["503"])[0] if failing else None,
        delay=int(query.get("delay_ms", ["0"])[0]) / 1000,
        hang=int(query.get("hang_ms", ["10000"])[0]) / 1000,
    )


def answer_body(plan: Plan, body: bytes) -> bytes:
    return json.dumps(
        {"key": plan.key, "attempt": plan.attempt, "body_length": len(body), "body_sha256": hashlib.sha256(body).hexdigest()}
    ).encode()


def stats_body(target: str) -> bytes:
    key = parse_qs(urlsplit(target).query).get("key", ["-"])[0]
    stats = KEYS.get(key, KeyStats())
    return json.dumps(
        {
            "count": stats.count,
            "bodies": stats.bodies,
            "max_in_flight": stats.max_in_flight,
            "attempt_headers": stats.attempt_headers,
            "retry_headers": stats.retry_headers,
            "hosts": stats.hosts,
        }
    ).encode()


class InFlight:
    def __init__(self, key: str) -> None:
        self.stats = KEYS.setdefault(key, KeyStats())

    def __enter__(self) -> None:
        self.stats.in_flight += 1
        self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)

    def __exit__(self, *exc) -> None:
        self.stats.in_flight -= 1


class Reset(Exception):
    """Close this HTTP/1.1 connection without answering."""


async def serve_h11(stream: trio.SocketStream, first: bytes) -> None:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(first)
    while True:
        request, body = None, bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                conn.receive_data(data)
                if not data and conn.their_state is not h11.DONE:
                    return
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return
        assert request is not None
        target = request.target.decode("latin-1")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request.headers}
        if urlsplit(target).path == "/__stats":
            status, extra, data = 200, [], stats_body(target)
        else:
            plan = plan_for(target, headers, bytes(body))
            with InFlight(plan.key):
                await trio.sleep(plan.delay)
                if plan.how == "reset":
                    return  # the caller closes the socket: no response at all
                if plan.how == "hang":
                    await trio.sleep(plan.hang)
                    plan.how = None
                status, extra, data = respond(plan, bytes(body))
        response_headers = [("content-type", "application/json"), ("content-length", str(len(data))), *extra]
        await stream.send_all(conn.send(h11.Response(status_code=status, headers=response_headers, reason=b"X")))
        await stream.send_all(conn.send(h11.Data(data=data)))
        await stream.send_all(conn.send(h11.EndOfMessage()))
        if conn.our_state is h11.MUST_CLOSE:
            return
        conn.start_next_cycle()


def respond(plan: Plan, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
    """(status, extra headers, body) for an answer that is not a reset or a hang."""
    if plan.how is None:
        return 200, [("x-attempt", str(plan.attempt))], answer_body(plan, body)
    if plan.how.startswith("grpc-"):
        return 200, [("content-type", "application/grpc"), ("grpc-status", plan.how[5:]), ("x-attempt", str(plan.attempt))], b""
    return int(plan.how), [("x-attempt", str(plan.attempt))], answer_body(plan, body)


class H2Session:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="latin-1", validate_inbound_headers=False)
        )
        self.send_lock = trio.Lock()
        self.requests: dict[int, tuple[dict[str, str], bytearray]] = {}

    async def flush(self) -> None:
        async with self.send_lock:
            data = self.conn.data_to_send()
            if data:
                await self.stream.send_all(data)

    async def run(self, first: bytes, nursery: trio.Nursery) -> None:
        self.conn.initiate_connection()
        await self.flush()
        data = first
        while data:
            for event in self.conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    self.requests[event.stream_id] = (dict(event.headers), bytearray())
                elif isinstance(event, h2.events.DataReceived):
                    if event.stream_id in self.requests:
                        self.requests[event.stream_id][1].extend(event.data)
                    self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id in self.requests:
                    nursery.start_soon(self.answer, event.stream_id)
                elif isinstance(event, h2.events.StreamReset):
                    self.requests.pop(event.stream_id, None)
            await self.flush()
            data = await self.stream.receive_some(65536)
        nursery.cancel_scope.cancel()

    async def answer(self, stream_id: int) -> None:
        headers, body = self.requests[stream_id]
        target = headers.get(":path", "/")
        try:
            if urlsplit(target).path == "/__stats":
                status, extra, data = 200, [], stats_body(target)
            else:
                plan = plan_for(target, headers, bytes(body))
                with InFlight(plan.key):
                    await trio.sleep(plan.delay)
                    if plan.how in ("reset", "refuse"):
                        code = h2.errors.ErrorCodes.REFUSED_STREAM if plan.how == "refuse" else h2.errors.ErrorCodes.INTERNAL_ERROR
                        self.conn.reset_stream(stream_id, code)
                        await self.flush()
                        return
                    if plan.how == "hang":
                        await trio.sleep(plan.hang)
                        plan.how = None
                    status, extra, data = respond(plan, bytes(body))
            if stream_id not in self.requests:
                return  # reset by the client meanwhile
            response_headers = [(":status", str(status)), ("content-type", "application/json"), *extra]
            self.conn.send_headers(stream_id, response_headers, end_stream=not data)
            if data:
                self.conn.send_data(stream_id, data, end_stream=True)
            await self.flush()
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, trio.BrokenResourceError):
            pass
        finally:
            self.requests.pop(stream_id, None)


EXPECTED = (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError, h2.exceptions.ProtocolError)


def expected(error: BaseException) -> bool:
    inner = getattr(error, "exceptions", None)
    if inner is not None:
        return all(expected(e) for e in inner)
    return isinstance(error, EXPECTED)


async def handle(stream: trio.SocketStream) -> None:
    try:
        first = b""
        while len(first) < len(H2_PREFACE) and H2_PREFACE.startswith(first):
            data = await stream.receive_some(65536)
            if not data:
                return
            first += data
        if first.startswith(H2_PREFACE):
            async with trio.open_nursery() as nursery:
                await H2Session(stream).run(first, nursery)
        else:
            await serve_h11(stream, first)
    except Exception as error:
        if not expected(error):
            traceback.print_exc()
    finally:
        await stream.aclose()


async def main(host: str, port: int) -> None:
    listeners = await trio.open_tcp_listeners(port, host=host, backlog=1024)
    print(f"READY {listeners[0].socket.getsockname()[1]}", flush=True)
    await trio.serve_listeners(handle, listeners)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    try:
        trio.run(main, args.host, args.port)
    except KeyboardInterrupt:
        sys.exit(0)
