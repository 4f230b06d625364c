"""HTTP/1.1 + h2c (prior knowledge) upstream that echoes each request back as JSON with its own name.

With --log-requests it also writes `request METHOD TARGET` to stderr (its log) for every request
head it receives, so a test can tell what reached it and what did not.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

import h11
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import trio

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def make_response(name: str, method: str, target: str, headers: list[tuple[str, str]], body: bytes):
    """Build (status, headers, body) for one request.

    Query knobs let tests shape the answer without extra servers:
    `delay_ms` (sleep first, handled by the caller), `status` (response status).
    """
    parts = urlsplit(target)
    query = parse_qs(parts.query, keep_blank_values=True)
    status = int(query.get("status", ["200"])[0])
    merged: dict[str, str] = {}
    for key, value in headers:
        # Duplicate header fields are folded the way RFC 9110 allows, so tests see one value.
        merged[key] = f"{merged[key]},{value}" if key in merged else value
    payload = {
        "name": name,
        "method": method,
        "path": parts.path,
        "query": parts.query,
        "headers": merged,
        "body": body.decode("latin-1"),
    }
    data = json.dumps(payload, sort_keys=True).encode()
    response_headers = [
        ("content-type", "application/json"),
        ("content-length", str(len(data))),
        ("x-upstream", name),
        # Present on every response so tests can check response_headers_to_remove.
        ("x-upstream-remove-me", "yes"),
    ]
    return status, response_headers, data


# --delay-ms: a slow app, whatever its callers ask (a request's own delay_ms still wins).
DEFAULT_DELAY_MS = 0


def delay_of(target: str) -> float:
    query = parse_qs(urlsplit(target).query)
    return int(query.get("delay_ms", [str(DEFAULT_DELAY_MS)])[0]) / 1000.0


LOG_REQUESTS = False


def log_request(method: str, target: str) -> None:
    if LOG_REQUESTS:
        print(f"request {method} {target}", file=sys.stderr, flush=True)


async def serve_h11(stream: trio.SocketStream, first: bytes, name: str) -> None:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(first)
    while True:
        request = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if conn.they_are_waiting_for_100_continue:
                    await stream.send_all(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
                data = await stream.receive_some(65536)
                conn.receive_data(data)
                if not data and conn.their_state is not h11.DONE:
                    return
                continue
            if isinstance(event, h11.Request):
                request = event
                log_request(event.method.decode("latin-1"), event.target.decode("latin-1"))
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, (h11.ConnectionClosed,)) or event is h11.PAUSED:
                return
        assert request is not None
        target = request.target.decode("latin-1")
        headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in request.headers]
        await trio.sleep(delay_of(target))
        status, resp_headers, data = make_response(name, request.method.decode(), target, headers, bytes(body))
        # A reason phrase keeps strict parsers (h2load's) happy; h11 sends none by default.
        reason = HTTPStatus(status).phrase.encode() if status in HTTPStatus._value2member_map_ else b"Status"
        await stream.send_all(conn.send(h11.Response(status_code=status, headers=resp_headers, reason=reason)))
        await stream.send_all(conn.send(h11.Data(data=data)))
        await stream.send_all(conn.send(h11.EndOfMessage()))
        if conn.our_state is h11.MUST_CLOSE:
            return
        conn.start_next_cycle()


class H2Session:
    """One h2c server connection: requests are answered concurrently, each in its own task."""

    def __init__(self, stream: trio.SocketStream, name: str) -> None:
        self.stream = stream
        self.name = name
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="latin-1", validate_inbound_headers=False)
        )
        self.send_lock = trio.Lock()
        self.window_opened = trio.Event()
        self.requests: dict[int, tuple[list[tuple[str, str]], bytearray]] = {}

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
                self.on_event(event, nursery)
            await self.flush()
            data = await self.stream.receive_some(65536)
        nursery.cancel_scope.cancel()

    def on_event(self, event, nursery: trio.Nursery) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self.requests[event.stream_id] = (list(event.headers), bytearray())
            pseudo = dict(h for h in event.headers if h[0].startswith(":"))
            log_request(pseudo.get(":method", ""), pseudo.get(":path", pseudo.get(":authority", "")))
            # A request without a body comes with its StreamEnded event too: answered there, once.
        elif isinstance(event, h2.events.DataReceived):
            if event.stream_id in self.requests:
                self.requests[event.stream_id][1].extend(event.data)
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            if event.stream_id in self.requests:
                nursery.start_soon(self.respond, event.stream_id)
        elif isinstance(event, h2.events.StreamReset):
            self.requests.pop(event.stream_id, None)
        elif isinstance(event, h2.events.WindowUpdated):
            # Wake every sender blocked on flow control; each re-checks its own window.
            self.window_opened.set()
            self.window_opened = trio.Event()

    async def respond(self, stream_id: int) -> None:
        if stream_id not in self.requests:
            return  # reset by the client before its turn came
        headers, body = self.requests[stream_id]
        pseudo = dict(h for h in headers if h[0].startswith(":"))
        regular = [h for h in headers if not h[0].startswith(":")]
        target = pseudo.get(":path", "/")
        await trio.sleep(delay_of(target))
        if stream_id not in self.requests:
            return  # reset by the client while we slept
        status, resp_headers, data = make_response(self.name, pseudo.get(":method", "GET"), target, regular, bytes(body))
        try:
            self.conn.send_headers(stream_id, [(":status", str(status))] + resp_headers)
            await self.flush()
            while data:
                window = min(self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size)
                if window <= 0:
                    await self.window_opened.wait()
                    continue
                chunk, data = data[:window], data[window:]
                self.conn.send_data(stream_id, chunk)
                await self.flush()
            self.conn.end_stream(stream_id)
            await self.flush()
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, trio.BrokenResourceError):
            pass
        finally:
            self.requests.pop(stream_id, None)


EXPECTED_FAILURES = (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError, h2.exceptions.ProtocolError)


def expected_failure(error: BaseException) -> bool:
    # A session's nursery raises its tasks' errors as an exception group.
    inner = getattr(error, "exceptions", None)
    if inner is not None:
        return all(expected_failure(e) for e in inner)
    return isinstance(error, EXPECTED_FAILURES)


async def handle(stream: trio.SocketStream, name: str) -> None:
    try:
        first = b""
        # Read just enough to tell the h2 preface from an HTTP/1.x request line.
        while len(first) < len(H2_PREFACE) and H2_PREFACE.startswith(first):
            data = await stream.receive_some(65536)
            if not data:
                return
            first += data
        if first.startswith(H2_PREFACE):
            async with trio.open_nursery() as nursery:
                await H2Session(stream, name).run(first, nursery)
        else:
            await serve_h11(stream, first, name)
    except Exception as error:
        # One connection's failure must never stop the server: the suite shares it across tests.
        # Expected ones (the peer went away, broke HTTP, or sent a CONNECT h11 will not answer
        # with a body) end that connection quietly; anything else is logged for the test to see.
        if not expected_failure(error):
            traceback.print_exc()
    finally:
        await stream.aclose()


async def main(name: str, host: str, port: int) -> None:
    listeners = await trio.open_tcp_listeners(port, host=host, backlog=1024)
    print(f"READY {listeners[0].socket.getsockname()[1]}", flush=True)
    await trio.serve_listeners(lambda s: handle(s, name), listeners)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--log-requests", action="store_true", help="write each request head received to stderr")
    parser.add_argument("--delay-ms", type=int, default=0, help="wait this long before every answer")
    args = parser.parse_args()
    LOG_REQUESTS = args.log_requests
    DEFAULT_DELAY_MS = args.delay_ms
    try:
        trio.run(main, args.name, args.host, args.port)
    except KeyboardInterrupt:
        sys.exit(0)
