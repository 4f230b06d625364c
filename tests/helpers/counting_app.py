"""An HTTP/1.1 + h2 app (optionally behind its own TLS) that counts every connection, byte and request it receives."""

from __future__ import annotations

import socket
import socketserver
import ssl
import threading
import time
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.events
import h2.exceptions

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
BODY = b"counting app: ok\n"


@dataclass
class Counts:
    connections: int = 0
    handshake_failures: int = 0
    bytes: int = 0  # application bytes, after TLS decryption when the app terminates TLS itself
    requests: int = 0


class CountingApp:
    """Serves 200 + BODY to every request; `counts` says what reached it (the sidecar tests' ground truth)."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.tls = tls
        self.counts = Counts()
        self.headers_seen: list[dict[str, str]] = []
        self._lock = threading.Lock()
        app = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                app._serve(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True
            request_queue_size = 512

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name=f"app:{self.port}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def snapshot(self) -> Counts:
        with self._lock:
            return Counts(**vars(self.counts))

    def _add(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self.counts, name, getattr(self.counts, name) + delta)

    def _serve(self, sock: socket.socket) -> None:
        self._add(connections=1)
        sock.settimeout(30)
        if self.tls is not None:
            try:
                sock = self.tls.wrap_socket(sock, server_side=True)
            except (ssl.SSLError, OSError):
                self._add(handshake_failures=1)
                return
        try:
            first = self._recv(sock)
            alpn = sock.selected_alpn_protocol() if isinstance(sock, ssl.SSLSocket) else None
            if alpn == "h2" or first.startswith(H2_PREFACE[: len(first)]) and first:
                self._serve_h2(sock, first)
            elif first:
                self._serve_http1(sock, first)
        except (OSError, ssl.SSLError, h2.exceptions.ProtocolError):
            pass
        finally:
            try:
                sock.close()
            except OSError:
                pass

    def _recv(self, sock: socket.socket) -> bytes:
        data = sock.recv(65536)
        self._add(bytes=len(data))
        return data

    def _serve_http1(self, sock: socket.socket, buffered: bytes) -> None:
        while True:
            while b"\r\n\r\n" not in buffered:
                chunk = self._recv(sock)
                if not chunk:
                    return
                buffered += chunk
            head, _, buffered = buffered.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {
                k.strip().lower(): v.strip()
                for k, _, v in (line.partition(":") for line in lines[1:])
            }
            length = int(headers.get("content-length", "0") or 0)
            while len(buffered) < length:
                chunk = self._recv(sock)
                if not chunk:
                    return
                buffered += chunk
            buffered = buffered[length:]
            self._request(headers)
            sock.sendall(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: "
                + str(len(BODY)).encode()
                + b"\r\n\r\n"
                + BODY
            )
            if headers.get("connection", "").lower() == "close":
                return

    def _serve_h2(self, sock: socket.socket, first: bytes) -> None:
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="latin-1")
        )
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        data = first
        while data:
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    self._request(dict(event.headers))
                    conn.send_headers(
                        event.stream_id, [(":status", "200"), ("content-length", str(len(BODY)))]
                    )
                    conn.send_data(event.stream_id, BODY, end_stream=True)
                elif isinstance(event, h2.events.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.ConnectionTerminated):
                    return
            pending = conn.data_to_send()
            if pending:
                sock.sendall(pending)
            data = self._recv(sock)

    def _request(self, headers: dict[str, str]) -> None:
        self._add(requests=1)
        with self._lock:
            self.headers_seen.append(headers)

    def wait_quiet(self, settle: float = 0.3, timeout: float = 5.0) -> Counts:
        """The counts once no byte has arrived for `settle` seconds (in-flight data has landed)."""
        deadline = time.monotonic() + timeout
        last = self.snapshot()
        while time.monotonic() < deadline:
            time.sleep(settle)
            current = self.snapshot()
            if current == last:
                return current
            last = current
        return last
