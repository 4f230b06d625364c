"""A tiny HTTP app for the README's example: says hello and echoes the request it received.

Usage: python examples/app.py [PORT]   (default 8080, on 127.0.0.1, where examples/sidecar.yaml
sends traffic). It exits cleanly on SIGTERM or Ctrl-C, as an app under `meshctl run` should.
"""

import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Hello(BaseHTTPRequestHandler):
    """Answers every GET with a greeting and the headers it received, so the proxy's are visible."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        lines = [f"hello from examples/app.py: {self.command} {self.path}", "", "request headers:"]
        lines += [f"  {name}: {value}" for name, value in self.headers.items()]
        body = ("\n".join(lines) + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def main() -> None:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8080
    # SIGTERM (what `meshctl run` passes on at shutdown) ends serve_forever like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    with ThreadingHTTPServer(("127.0.0.1", port), Hello) as server:
        print(f"examples/app.py listening on http://127.0.0.1:{port}/", file=sys.stderr, flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
