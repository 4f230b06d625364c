"""A steady load through a client sidecar, as an app sends it: a fixed rate over keep-alive
connections, every answer kept with its time, for tests that must show 0 failed requests."""

from __future__ import annotations

import http.client
import json
import threading
import time

RATE = 200  # requests per second


class PacedLoad(threading.Thread):
    """GET reviews:9080 through a client sidecar at a fixed rate over keep-alive connections, as
    an app does; every answer (the echo app's version, or the failure) kept with its time."""

    def __init__(self, port: int, rate: float = RATE, connections: int = 4, host: str = "reviews:9080") -> None:
        super().__init__(daemon=True)
        self.port, self.interval, self.connections, self.host = port, connections / rate, connections, host
        self.answers: list[tuple[float, str]] = []
        self.halt = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        workers = [threading.Thread(target=self._connection, args=(n,), daemon=True) for n in range(self.connections)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()

    def _connection(self, number: int) -> None:
        connection = None
        due = time.monotonic() + number * self.interval / self.connections
        while not self.halt.is_set():
            sent = time.monotonic()
            try:
                if connection is None:
                    connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                connection.request("GET", "/", headers={"Host": self.host})
                response = connection.getresponse()
                body = response.read()
                answer = json.loads(body)["name"] if response.status == 200 else f"HTTP {response.status} {body[:80]!r}"
            except (OSError, http.client.HTTPException, ValueError) as error:
                answer = f"error: {error!r}"
                if connection is not None:
                    connection.close()
                connection = None
            with self._lock:
                self.answers.append((sent, answer))
            due += self.interval
            time.sleep(max(0.0, due - time.monotonic()))

    def failures(self, versions: set[str]) -> list[tuple[float, str]]:
        with self._lock:
            return [(t, a) for t, a in self.answers if a not in versions]

    def count(self) -> int:
        return len(self.answers)

    def stop(self) -> None:
        self.halt.set()
        self.join(10)
