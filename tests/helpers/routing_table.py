"""One bootstrap covering every route match kind and action, and the requests that probe it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .bootstrap import Json, bootstrap, cluster, http_listener, route_configuration

ROUTE_TIMEOUT = "0.5s"


def add(key: str, value: str) -> Json:
    return {"header": {"key": key, "value": value}}


def tagged(name: str, match: Json, action: Json, **extra: Any) -> Json:
    """A route that stamps `x-route: <name>` on its response, so tests see which route matched."""
    return {"name": name, "match": match, **action, "response_headers_to_add": [add("x-route", name)], **extra}


def to(cluster_name: str, **options: Any) -> Json:
    return {"route": {"cluster": cluster_name, **options}}


def header(name: str, **matcher: Any) -> Json:
    return {"name": name, **matcher}


MAIN_ROUTES = [
    tagged("exact-path", {"path": "/exact"}, to("a")),
    tagged("regex-path", {"safe_regex": {"regex": "^/regex/[0-9]+$"}}, to("b")),
    tagged("header-exact", {"prefix": "/headers", "headers": [header("x-exact", string_match={"exact": "yes"})]}, to("a")),
    tagged("header-prefix", {"prefix": "/headers", "headers": [header("x-prefix", string_match={"prefix": "pre"})]}, to("b")),
    tagged(
        "header-regex",
        {"prefix": "/headers", "headers": [header("x-regex", string_match={"safe_regex": {"regex": "^v[0-9]+$"}})]},
        to("a"),
    ),
    tagged("header-present", {"prefix": "/headers", "headers": [header("x-present", present_match=True)]}, to("b")),
    tagged(
        "headers-none",
        {"prefix": "/headers"},
        {"direct_response": {"status": 200, "body": {"inline_string": "no header matched"}}},
    ),
    tagged(
        "query-exact",
        {"prefix": "/query", "query_parameters": [{"name": "version", "string_match": {"exact": "2"}}]},
        to("b"),
    ),
    tagged(
        "query-present",
        {"prefix": "/query", "query_parameters": [{"name": "debug", "present_match": True}]},
        to("a"),
    ),
    tagged("query-none", {"prefix": "/query"}, to("a")),
    tagged("method-post", {"prefix": "/method", "headers": [header(":method", string_match={"exact": "POST"})]}, to("b")),
    tagged("method-other", {"prefix": "/method"}, to("a")),
    tagged(
        "weighted",
        {"prefix": "/weighted"},
        {"route": {"weighted_clusters": {"clusters": [{"name": "a", "weight": 0}, {"name": "b", "weight": 100}]}}},
    ),
    tagged("prefix-rewrite", {"prefix": "/rewrite/"}, to("a", prefix_rewrite="/rewritten/")),
    tagged("host-rewrite", {"prefix": "/host-rewrite"}, to("a", host_rewrite_literal="rewritten.example.com")),
    tagged("redirect-host", {"prefix": "/redirect/host"}, {"redirect": {"host_redirect": "other.example.com"}}),
    tagged("redirect-path", {"prefix": "/redirect/path"}, {"redirect": {"path_redirect": "/new/path"}}),
    tagged("redirect-https", {"prefix": "/redirect/https"}, {"redirect": {"https_redirect": True}}),
    tagged(
        "redirect-code",
        {"prefix": "/redirect/code"},
        {"redirect": {"path_redirect": "/moved", "response_code": "PERMANENT_REDIRECT"}},
    ),
    tagged("redirect-prefix", {"prefix": "/redirect/prefix/"}, {"redirect": {"prefix_rewrite": "/replaced/"}}),
    # Longer prefix first: "/direct" would also match "/direct-empty".
    tagged("direct-empty", {"prefix": "/direct-empty"}, {"direct_response": {"status": 503}}),
    tagged(
        "direct", {"prefix": "/direct"}, {"direct_response": {"status": 418, "body": {"inline_string": "short and stout"}}}
    ),
    tagged(
        "modify",
        {"prefix": "/modify"},
        to("a"),
        request_headers_to_add=[
            add("x-route-added", "route"),
            add("x-both", "route"),
            {"header": {"key": "x-overwrite", "value": "route"}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"},
        ],
        request_headers_to_remove=["x-remove-me"],
        response_headers_to_remove=["x-upstream-remove-me"],
    ),
    tagged("timeout", {"prefix": "/timeout"}, to("a", timeout=ROUTE_TIMEOUT)),
    tagged("catch-all", {"prefix": "/"}, to("a")),
]


def vhost_stamp(name: str) -> list[Json]:
    return [add("x-vhost", name)]


def routing_bootstrap(listener_port: int, port_a: int, port_b: int) -> Json:
    virtual_hosts = [
        {
            "name": "main",
            "domains": ["main.example.com", "main.example.com:8080"],
            "routes": MAIN_ROUTES,
            "request_headers_to_add": [add("x-vhost-added", "main"), add("x-both", "vhost")],
            "request_headers_to_remove": ["x-vhost-remove"],
            "response_headers_to_add": vhost_stamp("main"),
        },
        {
            "name": "exact",
            "domains": ["exact.example.com"],
            "routes": [tagged("exact-vh", {"prefix": "/"}, to("a"))],
            "response_headers_to_add": vhost_stamp("exact"),
            "response_headers_to_remove": ["x-upstream-remove-me"],
        },
        {
            "name": "exact-port",
            "domains": ["port.example.com:8080"],
            "routes": [tagged("port-vh", {"prefix": "/"}, to("b"))],
            "response_headers_to_add": vhost_stamp("exact-port"),
        },
        {
            "name": "suffix",
            "domains": ["*.suffix.example"],
            "routes": [tagged("suffix-vh", {"prefix": "/"}, to("b"))],
            "response_headers_to_add": vhost_stamp("suffix"),
        },
        {
            "name": "prefix",
            "domains": ["prefix.*"],
            "routes": [tagged("prefix-vh", {"prefix": "/"}, to("a"))],
            "response_headers_to_add": vhost_stamp("prefix"),
        },
        {
            "name": "default",
            "domains": ["*"],
            "routes": [tagged("default-vh", {"prefix": "/"}, to("b"))],
            "response_headers_to_add": vhost_stamp("default"),
        },
    ]
    routes = route_configuration(
        "differential", virtual_hosts, response_headers_to_add=[add("x-route-config", "differential")]
    )
    return bootstrap([http_listener("http", listener_port, routes)], [cluster("a", port_a), cluster("b", port_b)])


@dataclass
class Case:
    """One request and what a user must see. Only the keys given in `expect` are checked."""

    id: str
    path: str
    host: str = "main.example.com"
    method: str = "GET"
    headers: list[tuple[str, str]] = field(default_factory=list)
    expect: dict[str, Any] = field(default_factory=dict)


def proxied(upstream: str, route: str, path: str | None = None, vhost: str = "main", **more: Any) -> dict[str, Any]:
    expect = {"status": 200, "upstream": upstream, "route": route, "vhost": vhost, **more}
    if path is not None:
        expect["upstream_path"] = path
    return expect


def local(status: int, route: str, **more: Any) -> dict[str, Any]:
    """A response the data plane makes itself (redirect, direct response, timeout)."""
    return {"status": status, "upstream": None, "route": route, "vhost": "main", **more}


H = "main.example.com"

CASES = [
    # Virtual host selection on the Host header.
    Case("vh-exact", "/x", host="exact.example.com", expect=proxied("a", "exact-vh", "/x", vhost="exact")),
    Case("vh-exact-case-insensitive", "/x", host="EXACT.Example.COM", expect=proxied("a", "exact-vh", vhost="exact")),
    # A port in Host is part of the name: "exact.example.com" does not match "exact.example.com:8080".
    Case("vh-exact-with-port-falls-to-default", "/x", host="exact.example.com:8080", expect=proxied("b", "default-vh", vhost="default")),
    Case("vh-domain-with-port", "/x", host="port.example.com:8080", expect=proxied("b", "port-vh", vhost="exact-port")),
    Case("vh-domain-with-port-needs-port", "/x", host="port.example.com", expect=proxied("b", "default-vh", vhost="default")),
    Case("vh-suffix", "/x", host="api.suffix.example", expect=proxied("b", "suffix-vh", vhost="suffix")),
    Case("vh-suffix-deep", "/x", host="a.b.suffix.example", expect=proxied("b", "suffix-vh", vhost="suffix")),
    Case("vh-suffix-needs-label", "/x", host="suffix.example", expect=proxied("b", "default-vh", vhost="default")),
    Case("vh-suffix-with-port", "/x", host="api.suffix.example:8080", expect=proxied("b", "default-vh", vhost="default")),
    Case("vh-prefix", "/x", host="prefix.anything", expect=proxied("a", "prefix-vh", vhost="prefix")),
    Case("vh-prefix-with-port", "/x", host="prefix.anything:9000", expect=proxied("a", "prefix-vh", vhost="prefix")),
    Case("vh-default", "/x", host="unknown.test", expect=proxied("b", "default-vh", vhost="default")),
    Case("vh-main-with-port", "/exact", host="main.example.com:8080", expect=proxied("a", "exact-path", "/exact")),
    # Path matching.
    Case("path-exact", "/exact", expect=proxied("a", "exact-path", "/exact")),
    Case("path-exact-ignores-query", "/exact?x=1", expect=proxied("a", "exact-path", "/exact", upstream_query="x=1")),
    Case("path-exact-not-prefix", "/exact/more", expect=proxied("a", "catch-all", "/exact/more")),
    Case("path-regex", "/regex/123", expect=proxied("b", "regex-path", "/regex/123")),
    Case("path-regex-full-match-only", "/regex/12a", expect=proxied("a", "catch-all", "/regex/12a")),
    Case("path-prefix-catch-all", "/some/where", expect=proxied("a", "catch-all", "/some/where")),
    # Header matching.
    Case("header-exact", "/headers", headers=[("x-exact", "yes")], expect=proxied("a", "header-exact")),
    Case("header-exact-mismatch", "/headers", headers=[("x-exact", "no")],
         expect=local(200, "headers-none", body="no header matched", content_type="text/plain")),
    Case("header-prefix", "/headers", headers=[("x-prefix", "prefixed")], expect=proxied("b", "header-prefix")),
    Case("header-regex", "/headers", headers=[("x-regex", "v42")], expect=proxied("a", "header-regex")),
    Case("header-regex-full-match-only", "/headers", headers=[("x-regex", "v42x")],
         expect=local(200, "headers-none", body="no header matched")),
    Case("header-present", "/headers", headers=[("x-present", "anything")], expect=proxied("b", "header-present")),
    Case("header-none", "/headers", expect=local(200, "headers-none", body="no header matched")),
    # Query parameter matching.
    Case("query-exact", "/query?version=2", expect=proxied("b", "query-exact", "/query", upstream_query="version=2")),
    Case("query-exact-mismatch", "/query?version=3", expect=proxied("a", "query-none")),
    Case("query-present-no-value", "/query?debug", expect=proxied("a", "query-present", upstream_query="debug")),
    Case("query-first-route-wins", "/query?debug=1&version=2", expect=proxied("b", "query-exact")),
    # Method matching through the :method pseudo-header.
    Case("method-post", "/method", method="POST", expect=proxied("b", "method-post", upstream_method="POST")),
    Case("method-get", "/method", expect=proxied("a", "method-other", upstream_method="GET")),
    Case("method-delete", "/method", method="DELETE", expect=proxied("a", "method-other", upstream_method="DELETE")),
    # Actions.
    Case("weighted-0-100", "/weighted", expect=proxied("b", "weighted", "/weighted")),
    Case("prefix-rewrite", "/rewrite/some/thing?q=1",
         expect=proxied("a", "prefix-rewrite", "/rewritten/some/thing", upstream_query="q=1")),
    Case("host-rewrite", "/host-rewrite", expect=proxied("a", "host-rewrite", upstream_headers={"host": "rewritten.example.com"})),
    Case("redirect-host", "/redirect/host/x?y=1",
         expect=local(301, "redirect-host", location="http://other.example.com/redirect/host/x?y=1", body="")),
    Case("redirect-path-keeps-query", "/redirect/path?keep=1",
         expect=local(301, "redirect-path", location="http://main.example.com/new/path?keep=1")),
    Case("redirect-https-keeps-port", "/redirect/https", host="main.example.com:8080",
         expect=local(301, "redirect-https", location="https://main.example.com:8080/redirect/https")),
    Case("redirect-https", "/redirect/https", expect=local(301, "redirect-https", location="https://main.example.com/redirect/https")),
    Case("redirect-308", "/redirect/code", expect=local(308, "redirect-code", location="http://main.example.com/moved")),
    Case("redirect-prefix-rewrite", "/redirect/prefix/abc?q",
         expect=local(301, "redirect-prefix", location="http://main.example.com/replaced/abc?q")),
    Case("direct-response", "/direct", expect=local(418, "direct", body="short and stout", content_type="text/plain")),
    Case("direct-response-no-body", "/direct-empty", expect=local(503, "direct-empty", body="", content_type=None)),
    Case(
        "header-mutations",
        "/modify",
        headers=[("x-remove-me", "1"), ("x-vhost-remove", "1"), ("x-both", "client"), ("x-overwrite", "client")],
        expect=proxied(
            "a",
            "modify",
            upstream_headers={
                "x-route-added": "route",
                "x-vhost-added": "main",
                # Appends keep the client's value, then the route's, then the virtual host's.
                "x-both": "client,route,vhost",
                "x-overwrite": "route",
                "x-remove-me": None,
                "x-vhost-remove": None,
            },
            response_headers={"x-upstream-remove-me": None, "x-route-config": "differential"},
        ),
    ),
    Case("vhost-removes-response-header", "/", host="exact.example.com",
         expect=proxied("a", "exact-vh", vhost="exact", response_headers={"x-upstream-remove-me": None})),
    Case("route-timeout-504", "/timeout?delay_ms=1500",
         expect=local(504, "timeout", body="upstream request timeout", content_type="text/plain")),
    Case("route-timeout-not-hit", "/timeout?delay_ms=50", expect=proxied("a", "timeout", "/timeout")),
]


def check(case: Case, observed: dict[str, Any]) -> list[str]:
    """Differences between `case.expect` and an observation, as readable lines."""
    problems = []
    expect = case.expect
    upstream = observed["upstream"] or {}
    response_headers = observed["response_headers"]
    actual = {
        "status": observed["status"],
        "upstream": upstream.get("name"),
        "route": response_headers.get("x-route"),
        "vhost": response_headers.get("x-vhost"),
        "upstream_path": upstream.get("path"),
        "upstream_query": upstream.get("query"),
        "upstream_method": upstream.get("method"),
        "location": observed["location"],
        "body": observed["body"],
        "content_type": observed["content-type"],
    }
    for key, wanted in expect.items():
        if key in ("upstream_headers", "response_headers"):
            source = upstream.get("headers", {}) if key == "upstream_headers" else response_headers
            for name, value in wanted.items():
                if source.get(name) != value:
                    problems.append(f"{key}[{name}]: expected {value!r}, got {source.get(name)!r}")
        elif actual[key] != wanted:  # None means "absent"
            problems.append(f"{key}: expected {wanted!r}, got {actual[key]!r}")
    return problems
