"""A small keep-alive HTTP/1.1 client on raw sockets (h11 parses), and a threaded load runner."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import h11


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


class Http1Client:
    """One persistent connection; reconnects only when the server closes it between requests."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.sock: socket.socket | None = None
        self.conn: h11.Connection | None = None
        self.connections_opened = 0

    def _connect(self) -> None:
        self.close()
        self.sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conn = h11.Connection(h11.CLIENT)
        self.connections_opened += 1

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock = self.conn = None

    def request(
        self, method: str, target: str, headers: list[tuple[str, str]] | None = None, body: bytes = b""
    ) -> Response:
        if self.conn is None or self.conn.our_state is not h11.IDLE:
            self._connect()
        headers = list(headers or [])
        if not any(name.lower() == "host" for name, _ in headers):
            headers.insert(0, ("host", f"{self.host}:{self.port}"))
        if body or method in ("POST", "PUT", "PATCH"):
            headers.append(("content-length", str(len(body))))
        assert self.conn is not None and self.sock is not None
        out = self.conn.send(h11.Request(method=method, target=target, headers=headers))
        out += self.conn.send(h11.Data(data=body)) if body else b""
        out += self.conn.send(h11.EndOfMessage())
        self.sock.sendall(out)
        status, response_headers, chunks = 0, {}, []
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(self.sock.recv(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
                for name, value in event.headers:
                    key = name.decode("latin-1").lower()
                    text = value.decode("latin-1")
                    response_headers[key] = f"{response_headers[key]},{text}" if key in response_headers else text
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("server closed the connection mid-response")
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        else:
            self.close()
        return Response(status, response_headers, b"".join(chunks))

    def get(self, target: str, headers: list[tuple[str, str]] | None = None) -> Response:
        return self.request("GET", target, headers)


@dataclass
class LoadResult:
    """What a load run saw: which upstream answered (the `x-upstream` header), and every failure."""

    by_upstream: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    total: int = 0

    def share(self, name: str) -> float:
        return 100.0 * self.by_upstream[name] / max(1, self.total)


def run_load(
    port: int,
    *,
    total: int | None = None,
    duration: float | None = None,
    concurrency: int = 4,
    target: str = "/",
    stop: threading.Event | None = None,
) -> LoadResult:
    """Send GETs on `concurrency` keep-alive connections until `total` requests or `duration` seconds.

    Bounded both ways: a run never exceeds 120 s even if the caller forgets a limit.
    """
    result = LoadResult()
    lock = threading.Lock()
    deadline = time.monotonic() + (duration if duration is not None else 120.0)
    budget = [total if total is not None else 10**9]

    def worker() -> None:
        client = Http1Client(port)
        seen: Counter = Counter()
        failures: list[str] = []
        count = 0
        try:
            while time.monotonic() < deadline and not (stop and stop.is_set()):
                with lock:
                    if budget[0] <= 0:
                        break
                    budget[0] -= 1
                try:
                    response = client.get(target)
                except (OSError, h11.ProtocolError) as error:
                    failures.append(f"{type(error).__name__}: {error}")
                    client.close()
                    continue
                finally:
                    count += 1
                if response.status != 200:
                    failures.append(f"status {response.status}: {response.body[:200]!r}")
                else:
                    seen[response.headers.get("x-upstream", "?")] += 1
        finally:
            client.close()
            with lock:
                result.by_upstream.update(seen)
                result.failures.extend(failures)
                result.total += count

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return result
