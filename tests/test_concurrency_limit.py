"""RateLimit concurrency rules under overload: a slow app behind the inbound listener the compiler makes
(run by Envoy 1.40 and by meshctl from the same bootstrap) never has more than `maxConcurrent`
requests in it, requests beyond what may wait are refused at once with a 503, and those admitted
succeed. A rule with a match limits only its requests, through a cluster of its own."""

from __future__ import annotations

import http.server
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml
from helpers.http_client import Http1Client

from meshctl.control import resource_types as types
from meshctl.control.compiler import INBOUND_LISTENER, compile_mesh, sidecar_resources
from meshctl.control.registry import Sidecar
from meshctl.resources import ValidationFailed, validate_documents

SLOW_SECONDS = 0.6
LIMIT = {
    "apiVersion": "policy.meshctl.io/v1alpha1", "kind": "RateLimit",
    "metadata": {"name": "reviews-concurrency", "namespace": "default"},
    "spec": {
        "selector": {"matchLabels": {"app": "reviews"}},
        "rules": [
            {"match": {"path": {"prefix": "/report"}}, "concurrency": {"maxConcurrent": 1}},
            {"match": {"path": {"prefix": "/queued"}},
             "concurrency": {"maxConcurrent": 1, "queue": 2, "queueTimeout": "0.2s"}},
            {"concurrency": {"maxConcurrent": 2, "queue": 1}},
        ],
    },
}  # fmt: skip


class SlowApp:
    """Answers every request after SLOW_SECONDS; records the most requests it held at once, per
    first path segment."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now: dict[str, int] = {}
        self.most: dict[str, int] = {}
        app = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                group = self.path.split("/")[1]
                with app.lock:
                    app.now[group] = app.now.get(group, 0) + 1
                    app.most[group] = max(app.most.get(group, 0), app.now[group])
                time.sleep(SLOW_SECONDS)
                with app.lock:
                    app.now[group] -= 1
                self.send_response(200)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def slow_app():
    app = SlowApp()
    yield app
    app.stop()


def inbound_bootstrap(app_port: int, inbound_port: int) -> dict:
    reviews = Sidecar(node_id="reviews-v1", service="reviews", version="v1", service_port=9080,
                      app_port=app_port, inbound_port=inbound_port, ready=True)  # fmt: skip
    compiled = sidecar_resources(compile_mesh([LIMIT], [reviews]), reviews)
    listeners = [x for x in compiled[types.LISTENER] if x["name"] == INBOUND_LISTENER]
    local = [x for x in compiled[types.CLUSTER] if x["name"].startswith("inbound|")]
    return {"static_resources": {"listeners": listeners, "clusters": local}}


def burst(port: int, path: str, count: int) -> list[tuple[int, float]]:
    """`count` requests at once, each on its own connection: (status, seconds) each."""

    def one(_: int) -> tuple[int, float]:
        client = Http1Client(port)
        started = time.monotonic()
        try:
            return client.request("GET", path, [("host", "reviews")]).status, time.monotonic() - started
        finally:
            client.close()

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def test_a_queue_timeout_refuses_a_request_that_waited_that_long_on_meshctl_envoy_ignores_it(
        dataplane, dataplane_kind, slow_app, port):  # fmt: skip
    dataplane(inbound_bootstrap(slow_app.port, port))
    replies = burst(port, "/queued/a", 4)
    print(f"{dataplane_kind}: /queued: {replies}; app held at most {slow_app.most}")
    assert slow_app.most == {"queued": 1}
    served = sorted(seconds for status, seconds in replies if status == 200)
    refused = sorted(seconds for status, seconds in replies if status == 503)
    if dataplane_kind == "meshctl":
        # One in the app; those that waited are refused after 0.2 s, long before it answers.
        assert len(served) == 1, replies
        assert any(0.18 < seconds < SLOW_SECONDS - 0.1 for seconds in refused), replies
    else:
        # Envoy keeps `meshctl.concurrency` and ignores it: its queue waits until a slot is free.
        assert len(served) >= 2 and served[-1] > 2 * SLOW_SECONDS - 0.1, replies


def test_the_app_never_holds_more_than_max_concurrent_and_the_rest_is_refused_at_once(
        dataplane, slow_app, port):  # fmt: skip
    dataplane(inbound_bootstrap(slow_app.port, port))
    everyone = burst(port, "/", 8)
    reports = burst(port, "/report/a", 4)
    print(f"/: {everyone}\n/report: {reports}\napp held at most {slow_app.most}")
    assert slow_app.most == {"": 2, "report": 1}
    for replies, limit, may_wait in ((everyone, 2, 1), (reports, 1, 0)):
        served = [seconds for status, seconds in replies if status == 200]
        refused = [seconds for status, seconds in replies if status == 503]
        assert len(served) + len(refused) == len(replies), replies
        # At least the limit is served; at most the limit, the queue and the requests that open
        # the cold sidecar's connections (Envoy's pending requests) wait and are served.
        assert limit <= len(served) <= 2 * limit + may_wait, replies
        # Refused at once, not after waiting for the app.
        assert refused and max(refused) < SLOW_SECONDS / 2, replies


@pytest.mark.parametrize(
    ("rule", "field", "reason"),
    [
        ({"concurrency": {"maxConcurrent": 0}}, "spec.rules[0].concurrency.maxConcurrent", "greater than or equal to 1"),
        ({"concurrency": {"maxConcurrent": 2, "queue": -1}}, "spec.rules[0].concurrency.queue", "greater than or equal to 0"),
        ({"concurrency": {"maxConcurrent": 2, "queueTimeout": "1s"}}, "spec.rules[0].concurrency.queueTimeout", "no queue"),
        ({"concurrency": {"maxConcurrent": 2, "queue": 1, "queueTimeout": "soon"}}, "spec.rules[0].concurrency.queueTimeout", "not a duration"),
        ({"concurrency": {"maxConcurrent": 2}, "limit": {"requests": 1, "unit": "second"}}, "spec.rules[0]", "exactly one of limit"),
        ({}, "spec.rules[0]", "exactly one of limit"),
        ({"concurrency": {"maxConcurrent": 2}, "shadow": True}, "spec.rules[0].shadow", "cannot be shadow"),
        ({"concurrency": {"maxConcurrent": 2}, "response": {"status": 429}}, "spec.rules[0].response", "takes no response"),
        ({"concurrency": {"maxConcurrent": 2}, "match": {"sourceNamespaces": ["x"]}}, "spec.rules[0].match", "whoever calls"),
    ],
)  # fmt: skip
def test_bad_concurrency_rules_are_refused_naming_the_field(rule, field, reason):
    document = {**LIMIT, "spec": {**LIMIT["spec"], "rules": [rule]}}
    with pytest.raises(ValidationFailed) as caught:
        validate_documents(yaml.safe_dump(document))
    issues = [str(issue) for issue in caught.value.issues]
    assert any(f": {field}" in issue and reason in issue for issue in issues), issues


def test_a_concurrency_rule_on_a_host_is_refused_for_a_destination_rule():
    document = {**LIMIT, "spec": {"host": "reviews", "rules": [{"concurrency": {"maxConcurrent": 2}}]}}
    with pytest.raises(ValidationFailed) as caught:
        validate_documents(yaml.safe_dump(document))
    assert any("spec.rules[0].concurrency" in str(i) and "connectionPool" in str(i) for i in caught.value.issues)
