"""The demo's bookinfo-like services, each a small HTTP app that knows nothing of the mesh.

    productpage  → reviews and details
    reviews v1   (no ratings)
    reviews v2   → ratings (black stars)
    reviews v3   → ratings (red stars)
    details, ratings

They call each other by service name (http://reviews:9080/) with urllib, which goes through
HTTP_PROXY: `meshctl run --service` points it at the app's own sidecar. Run one with
`python -m meshctl.demo.apps SERVICE --port PORT [--version V] [--fail-rate 0.3]`.
"""

from __future__ import annotations

import argparse
import json
import random
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

SERVICE_PORT = 9080
# Headers a caller's request passes on to the services it calls (as bookinfo does for tracing
# and for the end-user header that A/B rules match on).
PROPAGATED = ("end-user", "x-request-id", "traceparent")
STARS = {"v2": "black", "v3": "red"}


def call(service: str, path: str, headers: dict[str, str]) -> tuple[int, Any]:
    """GET http://SERVICE:9080/PATH through the sidecar; (status, JSON or error text)."""
    request = urllib.request.Request(f"http://{service}:{SERVICE_PORT}{path}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode("utf-8", "replace")[:200]
    except (OSError, ValueError) as error:
        return 502, f"{type(error).__name__}: {error}"


def answer(service: str, version: str, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    passed = {name: headers[name] for name in PROPAGATED if name in headers}
    if service == "productpage":
        reviews_status, reviews = call("reviews", "/reviews/0", passed)
        details_status, details = call("details", "/details/0", passed)
        status = 200 if reviews_status == 200 and details_status == 200 else 503
        return status, {
            "service": "productpage",
            "reviews": reviews
            if reviews_status == 200
            else {"status": reviews_status, "error": reviews},
            "details": details
            if details_status == 200
            else {"status": details_status, "error": details},
        }
    if service == "reviews":
        body: dict[str, Any] = {
            "service": "reviews",
            "version": version,
            "reviews": ["An extremely entertaining play", "Absolutely fun and entertaining"],
        }
        if version in STARS:
            ratings_status, ratings = call("ratings", "/ratings/0", passed)
            if ratings_status != 200:
                return 503, {**body, "error": f"ratings answered {ratings_status}"}
            body.update(ratings=ratings, stars=STARS[version])
        return 200, body
    if service == "details":
        return 200, {"service": "details", "version": version, "type": "paperback", "pages": 200}
    if service == "ratings":
        return 200, {
            "service": "ratings",
            "version": version,
            "ratings": {"Reviewer1": 5, "Reviewer2": 4},
        }
    return 404, {"error": f"no such demo service {service}"}


def make_handler(service: str, version: str, fail_rate: float) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: the sidecar reuses its upstream connections

        def do_GET(self) -> None:
            if fail_rate and random.random() < fail_rate:
                status, body = (
                    500,
                    {"service": service, "version": version, "error": "injected failure"},
                )
            else:
                status, body = answer(
                    service, version, {k.lower(): v for k, v in self.headers.items()}
                )
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.send_header("x-demo-version", f"{service}-{version or 'none'}")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the sidecars count and log; the demo's terminal stays readable

    return Handler


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="One of meshctl demo's services.")
    parser.add_argument("service", choices=["productpage", "reviews", "details", "ratings"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--version", default="v1")
    parser.add_argument(
        "--fail-rate", type=float, default=0.0, help="share of requests answered 500"
    )
    options = parser.parse_args(argv)
    server = ThreadingHTTPServer(
        ("127.0.0.1", options.port),
        make_handler(options.service, options.version, options.fail_rate),
    )
    server.daemon_threads = True
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
