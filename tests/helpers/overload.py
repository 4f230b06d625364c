"""An app that slows down under load (N worker slots; requests beyond them wait for one) and a
closed-loop overload of many clients against it, for the concurrency limit tests."""

from __future__ import annotations

import http.server
import threading
import time
from dataclasses import dataclass, field

from helpers.http_client import Http1Client


class SlotApp:
    """Serves each request in `service_seconds` on one of `slots` workers; the rest wait in the app,
    so its latency grows with the requests it holds beyond `slots`. `peak` is the most it held."""

    def __init__(self, slots: int, service_seconds: float) -> None:
        self.slots, self.service_seconds = slots, service_seconds
        self.workers = threading.Semaphore(slots)
        self.lock = threading.Lock()
        self.inside = 0
        self.peak = 0
        app = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                with app.lock:
                    app.inside += 1
                    app.peak = max(app.peak, app.inside)
                with app.workers:
                    time.sleep(app.service_seconds)
                with app.lock:
                    app.inside -= 1
                self.send_response(200)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def reset_peak(self) -> None:
        with self.lock:
            self.peak = self.inside

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    # Read at listen(): the default 5 drops a burst of connects, which then retry after 1 s.
    request_queue_size = 128


@dataclass
class Replies:
    """(status, seconds) of every request; status 0: no answer (connection failed)."""

    all: list[tuple[int, float]] = field(default_factory=list)

    def seconds(self, status: int) -> list[float]:
        return sorted(seconds for got, seconds in self.all if got == status)

    def count(self, status: int) -> int:
        return len(self.seconds(status))


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def overload(port: int, host: str, clients: int, seconds: float, pause_after_refusal: float) -> Replies:
    """`clients` keep-alive clients, each sending its next request as soon as the last is answered
    (after `pause_after_refusal` when it was refused, so refusals, answered at once, do not spin
    the machine's two cores), for `seconds`."""
    replies = Replies()
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client() -> None:
        connection = Http1Client(port, timeout=10)
        mine = []
        try:
            while time.monotonic() < stop_at:
                started = time.monotonic()
                try:
                    status = connection.request("GET", "/", [("host", host)]).status
                except OSError:
                    connection.close()
                    status = 0
                mine.append((status, time.monotonic() - started))
                if status != 200:
                    time.sleep(pause_after_refusal)
        finally:
            connection.close()
            with lock:
                replies.all.extend(mine)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 15)
    return replies
