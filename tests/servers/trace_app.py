"""An app of the demo's chain (productpage → reviews → ratings) that, like Istio asks of apps,
copies the trace headers of the request it serves onto the call it makes to the next service
(through its sidecar's outbound port), then answers with what it got."""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# The headers Istio's docs list for apps to propagate.
TRACE_HEADERS = (
    "x-request-id", "traceparent", "tracestate", "x-b3-traceid", "x-b3-spanid",
    "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags", "b3",
)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--next-host", help="HOST:PORT of the service to call, e.g. reviews:9080")
    parser.add_argument("--outbound-port", type=int, help="this instance's sidecar outbound port")
    options = parser.parse_args()
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            status, answer = 200, {"name": options.name}
            if options.next_host:
                copied = {name: self.headers[name] for name in TRACE_HEADERS if self.headers.get(name)}
                request = urllib.request.Request(
                    f"http://127.0.0.1:{options.outbound_port}{self.path}",
                    headers={**copied, "Host": options.next_host},
                )
                try:
                    with opener.open(request, timeout=10) as response:
                        answer["next"] = json.loads(response.read())
                except urllib.error.HTTPError as error:
                    status, answer["next_status"] = 502, error.code
                except OSError as error:
                    status, answer["next_error"] = 502, str(error)
            body = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    ThreadingHTTPServer(("127.0.0.1", options.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
