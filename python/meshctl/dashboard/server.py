"""The dashboard's web server: the page, and /api/graph, the mesh graph of the latest window, which
a background thread computes every interval from the registry and the sidecars' metrics."""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from meshctl.cli._sidecar_scrape import read_sidecars
from meshctl.dashboard.graph import mesh_graph
from meshctl.dashboard.istio_series import parse_istio_series

Json = dict[str, Any]
# Failed responses stay listed this long, and at most this many: "recent", and bounded.
RECENT_ERRORS_SECONDS = 300.0
RECENT_ERRORS_MAX = 200


class MeshWatch:
    """Reads the registry and every sidecar each interval; holds the latest window's graph."""

    def __init__(self, registry: Callable[[], list[dict]], interval: float) -> None:
        self.registry = registry  # the control plane's sidecars; raises OSError-like errors when unreachable
        self.interval = interval
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._graph: Json = {"nodes": [], "edges": [], "errors": [], "recentErrors": [], "windows": 0}
        self._recent: deque[tuple[float, Json]] = deque(maxlen=RECENT_ERRORS_MAX)  # (time.time(), error)
        self._sidecars: list[dict] = []
        self._registry_error = ""
        self._windows = 0

    def graph(self) -> Json:
        with self._lock:
            return self._graph

    def _registered(self) -> list[dict]:
        try:
            self._sidecars = self.registry()
            self._registry_error = ""
        except Exception as error:  # noqa: BLE001 - any failure to list keeps the last list, said on the page
            self._registry_error = f"control plane: {error}; showing the sidecars last listed"
        return self._sidecars

    def run(self) -> None:
        """Until `stop`: one read per interval, each window the growth since the read before."""
        previous = read_sidecars(self._registered(), parse_istio_series)
        while not self.stop.wait(self.interval):
            current = read_sidecars(self._registered(), parse_istio_series)
            windows = [
                series.growth_since(previous.by_node.get(node))
                for node, series in current.by_node.items()
                if node in previous.by_node  # first seen now: its growth is unknown until next time
            ]
            graph = mesh_graph(self._sidecars, windows, current.at - previous.at)
            self._remember_errors(graph["errors"])
            self._windows += 1
            graph.update({
                "at": datetime.now(UTC).isoformat(timespec="seconds"),
                "windows": self._windows,
                "sidecarsRead": len(current.by_node),
                "unreachable": current.unreachable,
                "registryError": self._registry_error,
                "recentErrors": [error for _, error in reversed(self._recent)],
            })  # fmt: skip
            with self._lock:
                self._graph = graph
            previous = current

    def _remember_errors(self, errors: list[Json]) -> None:
        now = time.time()
        stamp = datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds")
        for error in errors:
            self._recent.append((now, {**error, "at": stamp}))
        while self._recent and now - self._recent[0][0] > RECENT_ERRORS_SECONDS:
            self._recent.popleft()


def _page() -> bytes:
    return resources.files("meshctl.dashboard").joinpath("index.html").read_bytes()


def _handler(watch: MeshWatch) -> type[BaseHTTPRequestHandler]:
    page = _page()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path in ("/", "/index.html"):
                self._send(200, "text/html; charset=utf-8", page)
            elif path == "/api/graph":
                self._send(200, "application/json", json.dumps(watch.graph()).encode())
            else:
                self._send(404, "text/plain", b"dashboard: / and /api/graph\n")

        def _send(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # a page polling every two seconds would fill the terminal

    return Handler


class Dashboard:
    """The watch thread and the HTTP server thread, started and stopped together."""

    def __init__(self, registry: Callable[[], list[dict]], address: str, port: int, interval: float = 2.0) -> None:
        self.watch = MeshWatch(registry, interval)
        self.server = ThreadingHTTPServer((address, port), _handler(self.watch))
        self.server.daemon_threads = True
        self._threads = [
            threading.Thread(target=self.watch.run, name="dashboard-watch", daemon=True),
            threading.Thread(target=self.server.serve_forever, name="dashboard-http", daemon=True),
        ]

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/"

    def start(self) -> Dashboard:
        for thread in self._threads:
            thread.start()
        return self

    def close(self) -> None:
        self.watch.stop.set()
        self.server.shutdown()
        self.server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
