"""Send a request through a data plane and reduce the response to what a user can compare."""

from __future__ import annotations

import json
from typing import Any

from .http_client import Http1Client

# Headers that legitimately differ between data planes or between runs.
IGNORED_HEADERS = {"x-request-id", "date", "server", "x-envoy-upstream-service-time", "x-envoy-expected-rq-timeout-ms"}


def comparable(name: str) -> bool:
    return name not in IGNORED_HEADERS and not name.startswith("x-envoy-")


def observe(port: int, method: str, path: str, host: str, headers: list[tuple[str, str]]) -> dict[str, Any]:
    """Status, Location, the x-* and content-type response headers, and either the upstream's
    echo (name, method, path, query, request headers) or the locally generated body."""
    client = Http1Client(port)
    try:
        response = client.request(method, path, [("host", host), *headers], b"")
    finally:
        client.close()
    result: dict[str, Any] = {
        "status": response.status,
        "location": response.headers.get("location"),
        "content-type": response.headers.get("content-type"),
        "response_headers": {k: v for k, v in response.headers.items() if k.startswith("x-") and comparable(k)},
        "upstream": None,
        "body": None,
    }
    echoed = None
    if "x-upstream" in response.headers:
        try:
            echoed = json.loads(response.body)
        except ValueError:
            echoed = None
    if echoed is not None:
        result["upstream"] = {
            "name": echoed["name"],
            "method": echoed["method"],
            "path": echoed["path"],
            "query": echoed["query"],
            "headers": {k: v for k, v in echoed["headers"].items() if comparable(k)},
        }
    else:
        result["body"] = response.body.decode("latin-1")
    return result
