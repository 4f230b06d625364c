"""An app for fault drills: answers GET with {"name": NAME} as JSON over HTTP/1.1, until told
otherwise by a file: while `--fail-file` exists it answers 500, while `--hang-file` exists it
holds every request for 30 s. A file, so a test flips it mid-load without a control endpoint."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--fail-file", required=True)
    parser.add_argument("--hang-file", required=True)
    args = parser.parse_args()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Head and body go out in two writes: without this, Nagle's algorithm holds the body
        # back for the peer's delayed ACK (~40 ms a request).
        disable_nagle_algorithm = True

        def do_GET(self) -> None:
            if os.path.exists(args.hang_file):
                time.sleep(30)
            failing = os.path.exists(args.fail_file)
            body = json.dumps({"name": args.name, "failing": failing}).encode()
            self.send_response(500 if failing else 200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"flaky_app {args.name} on 127.0.0.1:{args.port}", file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
