"""Istio's traffic-management tasks (circuit breaking, request timeouts, retries, fault injection,
mirroring) with Istio's own YAML through `meshctl serve`, each on two client data planes: `meshctl
run` and a real Envoy 1.40 fed by the same control plane over ADS (tests/helpers/envoy_sidecar.py).
Both must show the user what Istio's task pages show; where they differ, each one's behaviour is
asserted and printed.

Shortened for test time, shape kept: the tasks' delays are shorter, and in the timeout task the
slowness lives in the upstream app itself (Istio's page delays ratings with a fault; here the
timeout is tested apart from the fault filter, which has its own task below). Upstream apps are
registered as plain instances without a sidecar of their own: every behaviour under test is the
calling sidecar's, and this keeps the 2-core budget for the clients.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers.control_plane import ControlPlane, start_control_plane
from helpers.envoy_sidecar import admin_get, register
from helpers.fortio import fortio_load
from helpers.mesh import apply, wait_until
from helpers.mesh_client import MeshClient
from helpers.procs import Process, start_upstream

HTTPBIN = "outbound|8000||httpbin.default.svc.cluster.local"
REVIEWS_V2 = "outbound|9080|v2|reviews.default.svc.cluster.local"
RATINGS_V1 = "outbound|9080|v1|ratings.default.svc.cluster.local"
HTTPBIN_V1 = "outbound|8000|v1|httpbin.default.svc.cluster.local"
HTTPBIN_V2 = "outbound|8000|v2|httpbin.default.svc.cluster.local"

# Istio's circuit-breaking task, as its page gives it.
CIRCUIT_BREAKER = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: httpbin
spec:
  host: httpbin
  trafficPolicy:
    connectionPool:
      tcp:
        maxConnections: 1
      http:
        http1MaxPendingRequests: 1
        maxRequestsPerConnection: 1
    outlierDetection:
      consecutive5xxErrors: 1
      interval: 1s
      baseEjectionTime: 3m
      maxEjectionPercent: 100
"""

# Bookinfo's subsets of reviews (destination-rule-all.yaml, the part this task uses).
REVIEWS_SUBSETS = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
spec:
  host: reviews
  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2
"""

# The request-timeouts task: reviews to v2 (step 1), then the same route with `timeout: 0.5s`.
REVIEWS_TO_V2 = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts:
  - reviews
  http:
  - route:
    - destination:
        host: reviews
        subset: v2
"""
REVIEWS_TIMEOUT = REVIEWS_TO_V2 + "    timeout: 0.5s\n"
SLOW_MS = 2000  # the task's 2 s delay, here in reviews v2 itself
BEYOND_DEFAULT_MS = 16_000  # longer than Envoy's default route timeout (15 s)

RATINGS_SUBSETS = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: ratings
spec:
  host: ratings
  subsets:
  - name: v1
    labels:
      version: v1
"""
# Istio's retries example (concepts/traffic-management), with retryOn 5xx.
RATINGS_TO_V1 = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: ratings
spec:
  hosts:
  - ratings
  http:
  - route:
    - destination:
        host: ratings
        subset: v1
"""
RATINGS_RETRIES = RATINGS_TO_V1 + "    retries:\n      attempts: 3\n      perTryTimeout: 2s\n      retryOn: 5xx\n"

# Istio's fault-injection task (Bookinfo's virtual-service-ratings-test-delay.yaml), its 7s delay
# shortened to 1s: user jason's calls to ratings wait, everyone else's go straight to v1.
FAULT_DELAY_S = 1.0
RATINGS_DELAY_FOR_JASON = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: ratings
spec:
  hosts:
  - ratings
  http:
  - match:
    - headers:
        end-user:
          exact: jason
    fault:
      delay:
        percentage:
          value: 100.0
        fixedDelay: 1s
    route:
    - destination:
        host: ratings
        subset: v1
  - route:
    - destination:
        host: ratings
        subset: v1
"""
# The same task's second step (virtual-service-ratings-test-abort.yaml): jason's calls get a 500.
RATINGS_ABORT_FOR_JASON = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: ratings
spec:
  hosts:
  - ratings
  http:
  - match:
    - headers:
        end-user:
          exact: jason
    fault:
      abort:
        percentage:
          value: 100.0
        httpStatus: 500
    route:
    - destination:
        host: ratings
        subset: v1
  - route:
    - destination:
        host: ratings
        subset: v1
"""
JASON = {"end-user": "jason"}  # what Bookinfo's productpage sends for a logged-in jason

# Istio's mirroring task: httpbin v1 and v2, all traffic to v1, then the same route mirrored to v2.
HTTPBIN_SUBSETS = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: httpbin
spec:
  host: httpbin
  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2
"""
HTTPBIN_TO_V1 = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: httpbin
spec:
  hosts:
  - httpbin
  http:
  - route:
    - destination:
        host: httpbin
        subset: v1
      weight: 100
"""
HTTPBIN_MIRRORED = (
    HTTPBIN_TO_V1 + "    mirror:\n      host: httpbin\n      subset: v2\n    mirrorPercentage:\n      value: 100.0\n"
)


@dataclass
class Answer:
    status: int
    body: str
    seconds: float

    @property
    def name(self) -> str | None:
        try:
            return json.loads(self.body)["name"]
        except (ValueError, KeyError, TypeError):
            return None


def ask(port: int, host: str, path: str = "/", timeout: float = 10.0,
        headers: dict[str, str] | None = None) -> Answer:  # fmt: skip
    """One GET to a sidecar's outbound port for `host` (the Host header names the service)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    headers = {"Host": host, **(headers or {})}
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)
    started = time.monotonic()
    try:
        with opener.open(request, timeout=timeout) as response:
            return Answer(response.status, response.read().decode(errors="replace"), time.monotonic() - started)
    except urllib.error.HTTPError as error:
        return Answer(error.code, error.read().decode(errors="replace"), time.monotonic() - started)
    except OSError as error:
        return Answer(0, f"{type(error).__name__}: {error}", time.monotonic() - started)


@dataclass
class Mesh:
    """A control plane, upstream instances registered with it, and client sidecars; all stopped by PID."""

    plane: ControlPlane
    directory: Path
    upstreams: list[Process] = field(default_factory=list)
    clients: list[MeshClient] = field(default_factory=list)

    def instance(self, service: str, version: str, port: int, script: str, *args: str) -> Process:
        """tests/servers/<script> registered as a ready instance of `service` on `port`."""
        process = start_upstream(script, self.directory, *args)
        self.upstreams.append(process)
        register(self.plane, f"{service}-{version}-{process.port}", service=service, version=version,
                 servicePort=port, appPort=process.port, ready=True)  # fmt: skip
        return process

    def client(self, kind: str) -> MeshClient:
        client = MeshClient(kind, self.plane, self.directory)
        self.clients.append(client)
        return client

    def stop(self) -> None:
        for client in self.clients:
            print(f"--- {client.kind} client log ---\n{client.log()}")
            client.stop()
        for process in self.upstreams:
            process.stop()
        print(f"--- meshctl serve ---\n{self.plane.log()[-3000:]}")
        self.plane.stop()


@pytest.fixture
def mesh(tmp_path: Path):
    mesh = Mesh(start_control_plane(tmp_path / "plane"), tmp_path)
    yield mesh
    mesh.stop()


def reached(client: MeshClient, host: str, path: str = "/", status: int = 200, timeout: float = 20.0,
            headers: dict[str, str] | None = None) -> Answer:  # fmt: skip
    """Wait until a request through `client` for `host` answers `status`; that answer."""
    answers: list[Answer] = []

    def answered() -> bool | Answer:
        answers.append(ask(client.outbound_port, host, path, headers=headers))
        return answers[-1].status == status or answers[-1]

    wait_until(answered, timeout, f"{client.kind} client: {host}{path} answers {status}", step=0.2)
    return answers[-1]


def envoy_holds(client: MeshClient, resource: tuple[str, str], *clusters: str) -> None:
    """A real Envoy got its config from our plane over ADS, NACKed none of it, and the plane
    recorded its ACK against `resource` (kind, name)."""
    if client.envoy is None:
        return
    client.envoy.wait_for(set(clusters), {"outbound"})
    assert client.envoy.rejected_updates() == 0, client.envoy.stats()
    status = client.envoy.wait_accepted(*resource)
    print(f"envoy: {resource[0]} {resource[1]} status {status}")


def test_circuit_breaking(mesh: Mesh, dataplane_kind: str):
    mesh.instance("httpbin", "v1", 8000, "http_echo.py", "--name", "httpbin", "--delay-ms", "20")
    apply(mesh.plane, CIRCUIT_BREAKER)
    client = mesh.client(dataplane_kind)
    reached(client, "httpbin:8000", "/get")  # the task's `fortio curl http://httpbin:8000/get`
    envoy_holds(client, ("dr", "httpbin"), HTTPBIN)
    if client.envoy is not None:
        cluster = client.envoy.dynamic_cluster(HTTPBIN)
        thresholds = cluster["circuit_breakers"]["thresholds"][0]
        assert (thresholds["max_connections"], thresholds["max_pending_requests"]) == (1, 1), thresholds

    one = fortio_load(client.outbound_port, "httpbin:8000", "/get", connections=1, requests=20)
    two = fortio_load(client.outbound_port, "httpbin:8000", "/get", connections=2, requests=20)
    before = client.counter(HTTPBIN, "upstream_rq_pending_overflow")
    three = fortio_load(client.outbound_port, "httpbin:8000", "/get", connections=3, requests=30)
    overflow = client.counter(HTTPBIN, "upstream_rq_pending_overflow") - before
    print(f"{dataplane_kind}: 1 connection: {one}")
    print(f"{dataplane_kind}: 2 connections: {two}")
    print(f"{dataplane_kind}: 3 connections: {three}; upstream_rq_pending_overflow +{overflow}")

    # One connection stays within one active and one pending request: nothing trips.
    assert one.codes == {200: 20}, one
    # Two connections fit too (one active, one pending), if the pending request takes the used
    # connection's slot before the first caller's next request arrives. Envoy retires the
    # connection and connects for the pending request in the same event-loop turn that ends the
    # response; meshctl hands the slot to the oldest pending request as the response ends
    # (upstream/pool.rs, give_or_free_slot). Before it did, the
    # pending request took it in its own task after a wake-up and lost that race to the caller's
    # next request: 4 to 7 of 20 refused in 5 runs, where Envoy refused 0 or 1.
    assert set(two.codes) <= {200, 503} and two.codes.get(503, 0) <= 3, two
    # Three at once: the third finds the pending slot taken and is refused at once with a 503.
    assert three.codes.get(503, 0) > 0 and three.codes.get(200, 0) > 0, three
    assert set(three.codes) == {200, 503}, three
    assert three.slowest_error < 0.5, three  # refused, never queued behind the slow ones
    assert overflow == three.codes[503], (overflow, three)
    # The overflow 503s are the client's own answers, not the upstream's: outlier detection
    # (consecutive5xxErrors: 1, ejection for 3 minutes) must not eject httpbin for them.
    after = ask(client.outbound_port, "httpbin:8000", "/get")
    assert after.status == 200, after


def test_request_timeouts(mesh: Mesh, dataplane_kind: str):
    mesh.instance("reviews", "v1", 9080, "http_echo.py", "--name", "reviews-v1")
    mesh.instance("reviews", "v2", 9080, "http_echo.py", "--name", "reviews-v2", "--delay-ms", str(SLOW_MS))
    apply(mesh.plane, REVIEWS_SUBSETS + "---\n" + REVIEWS_TO_V2)
    client = mesh.client(dataplane_kind)
    slow = reached(client, "reviews:9080")
    envoy_holds(client, ("vs", "reviews"), REVIEWS_V2)
    # Without a timeout the caller waits for the slow version: the request timeout is disabled by
    # default (past Envoy's own 15 s default too: the next test).
    assert slow.name == "reviews-v2" and slow.seconds >= SLOW_MS / 1000, slow

    apply(mesh.plane, REVIEWS_SUBSETS + "---\n" + REVIEWS_TIMEOUT)
    reached(client, "reviews:9080", status=504)
    answers = [ask(client.outbound_port, "reviews:9080") for _ in range(3)]
    timeouts = (
        client.counter(REVIEWS_V2, "upstream_rq_timeout") if client.envoy is not None
        # meshctl counts it as the UT response flag (Envoy's flag for it) rather than a counter.
        else client.meshctl_series("meshctl_upstream_rq_response_flags_total", REVIEWS_V2, ',flag="UT"')
    )  # fmt: skip
    print(f"{dataplane_kind}: without timeout {slow.status} in {slow.seconds:.2f}s; with timeout 0.5s: "
          + ", ".join(f"{a.status} in {a.seconds:.2f}s ({a.body.strip()!r})" for a in answers)
          + f"; timeouts counted: {timeouts}")  # fmt: skip
    for answer in answers:
        assert answer.status == 504, answer
        assert 0.45 <= answer.seconds < 1.5, answer  # after the timeout, not after the 2 s delay
    assert timeouts >= 4, timeouts  # the first 504 seen while waiting, and these three



def test_without_a_timeout_a_request_outlasts_envoys_15s_default(mesh: Mesh, dataplane_kind: str):
    """Istio's page: "By default, the request timeout is disabled". istiod writes `timeout: 0s` on
    every route without one, as meshctl's compiler does; Envoy would otherwise end the request
    with a 504 after its own default of 15 s."""
    mesh.instance("reviews", "v1", 9080, "http_echo.py", "--name", "reviews-v1")
    mesh.instance("reviews", "v2", 9080, "http_echo.py", "--name", "reviews-v2")
    apply(mesh.plane, REVIEWS_SUBSETS + "---\n" + REVIEWS_TO_V2)
    client = mesh.client(dataplane_kind)
    reached(client, "reviews:9080")
    envoy_holds(client, ("vs", "reviews"), REVIEWS_V2)
    wait_until(lambda: ask(client.outbound_port, "reviews:9080").name == "reviews-v2", 20, "the route to v2 holds")
    # The app sleeps as long as the request's delay_ms asks.
    answer = ask(client.outbound_port, "reviews:9080", f"/?delay_ms={BEYOND_DEFAULT_MS}", timeout=30.0)
    print(f"{dataplane_kind}: no route timeout, app answering after {BEYOND_DEFAULT_MS / 1000:.0f}s: "
          f"{answer.status} in {answer.seconds:.2f}s")  # fmt: skip
    assert answer.status == 200 and answer.name == "reviews-v2", answer
    assert answer.seconds >= BEYOND_DEFAULT_MS / 1000, answer

def test_retries(mesh: Mesh, dataplane_kind: str):
    mesh.instance("ratings", "v1", 9080, "http_echo.py", "--name", "ratings-good")
    # 500, not 503: Istio's default policy (no `retries`) retries 503 already, not 500.
    mesh.instance("ratings", "v1", 9080, "status_server.py", "--name", "ratings-bad", "--status", "500")
    apply(mesh.plane, RATINGS_SUBSETS + "---\n" + RATINGS_TO_V1)
    client = mesh.client(dataplane_kind)
    reached(client, "ratings:9080")
    envoy_holds(client, ("vs", "ratings"), RATINGS_V1)
    without = [ask(client.outbound_port, "ratings:9080").status for _ in range(20)]
    assert 500 in without and 200 in without, without  # both instances take requests; nobody retries 500

    apply(mesh.plane, RATINGS_SUBSETS + "---\n" + RATINGS_RETRIES)
    first_retries = client.counter(RATINGS_V1, "upstream_rq_retry")

    def retrying() -> bool | int:
        ask(client.outbound_port, "ratings:9080")
        return client.counter(RATINGS_V1, "upstream_rq_retry") > first_retries or first_retries

    wait_until(retrying, 15, f"{dataplane_kind} client retries ratings", step=0.1)
    before = {name: client.counter(RATINGS_V1, name) for name in ("upstream_rq_retry", "upstream_rq_retry_success")}
    answers = [ask(client.outbound_port, "ratings:9080") for _ in range(20)]
    after = {name: client.counter(RATINGS_V1, name) for name in before}
    rose = {name: after[name] - before[name] for name in before}
    print(f"{dataplane_kind}: without retries {sorted(without)}; with retries: "
          f"{[a.status for a in answers]}; counters rose {rose}")  # fmt: skip

    assert [a.status for a in answers] == [200] * 20, answers
    assert {a.name for a in answers} == {"ratings-good"}, answers
    # Each request that met the failing instance first was retried once, on the other instance
    # (previous_hosts), and that retry succeeded. With round robin over two instances every
    # request takes two picks (bad, then good), so on both data planes each one starts at the
    # failing instance: 20 retries for 20 requests, but only "some" is asserted.
    assert rose["upstream_rq_retry"] > 0, rose
    assert rose["upstream_rq_retry_success"] == rose["upstream_rq_retry"], rose


def faults_injected(client: MeshClient) -> dict[str, int]:
    """How many requests the client's outbound listeners delayed (DI) and aborted (FI)."""
    if client.envoy is not None:
        stats = client.envoy.stats()  # http.<stat prefix>.fault.delays_injected, aborts_injected
        return {flag: sum(value for name, value in stats.items() if name.endswith(f".fault.{counter}"))
                for flag, counter in (("DI", "delays_injected"), ("FI", "aborts_injected"))}  # fmt: skip
    # meshctl counts them as Envoy's response flags, per listener.
    text = admin_get(client.admin_port, "/stats/prometheus")
    series = r'^meshctl_downstream_rq_response_flags_total\{listener="[^"]*",flag="%s"\} (\d+)$'
    return {flag: sum(int(count) for count in re.findall(series % flag, text, re.MULTILINE))
            for flag in ("DI", "FI")}  # fmt: skip


def test_fault_injection(mesh: Mesh, dataplane_kind: str):
    mesh.instance("ratings", "v1", 9080, "http_echo.py", "--name", "ratings-v1")
    apply(mesh.plane, RATINGS_SUBSETS + "---\n" + RATINGS_DELAY_FOR_JASON)
    client = mesh.client(dataplane_kind)
    reached(client, "ratings:9080", "/ratings/0")
    envoy_holds(client, ("vs", "ratings"), RATINGS_V1)

    # Step 1, the delay: jason waits, everyone else does not.
    before = faults_injected(client)
    delayed = [ask(client.outbound_port, "ratings:9080", "/ratings/0", headers=JASON) for _ in range(3)]
    others = [ask(client.outbound_port, "ratings:9080", "/ratings/0") for _ in range(3)]
    after = faults_injected(client)
    print(f"{dataplane_kind}: delay for jason: " + ", ".join(f"{a.status} in {a.seconds:.3f}s" for a in delayed)
          + "; others: " + ", ".join(f"{a.status} in {a.seconds:.3f}s" for a in others)
          + f"; faults counted {before} -> {after}")  # fmt: skip
    for answer in delayed:
        assert answer.status == 200 and answer.name == "ratings-v1", answer  # delayed, then forwarded
        # 10 ms of slack below: Envoy's delay timer has fired up to ~1 ms early (0.999 s seen).
        assert FAULT_DELAY_S - 0.01 <= answer.seconds < FAULT_DELAY_S + 1.0, answer
    for answer in others:
        assert answer.status == 200 and answer.name == "ratings-v1", answer
        assert answer.seconds < 0.5, answer
    assert (after["DI"] - before["DI"], after["FI"] - before["FI"]) == (3, 0), (before, after)

    # Step 2, the abort: jason gets the fault filter's 500 at once, everyone else ratings v1.
    apply(mesh.plane, RATINGS_SUBSETS + "---\n" + RATINGS_ABORT_FOR_JASON)
    reached(client, "ratings:9080", "/ratings/0", status=500, headers=JASON)
    assert client.envoy is None or client.envoy.rejected_updates() == 0, client.envoy.stats()
    before = faults_injected(client)
    aborted = [ask(client.outbound_port, "ratings:9080", "/ratings/0", headers=JASON) for _ in range(3)]
    others = [ask(client.outbound_port, "ratings:9080", "/ratings/0") for _ in range(3)]
    after = faults_injected(client)
    print(f"{dataplane_kind}: abort for jason: "
          + ", ".join(f"{a.status} {a.body!r} in {a.seconds:.3f}s" for a in aborted)
          + "; others: " + ", ".join(f"{a.status} {a.name} in {a.seconds:.3f}s" for a in others)
          + f"; faults counted {before} -> {after}")  # fmt: skip
    for answer in aborted:
        assert (answer.status, answer.body) == (500, "fault filter abort"), answer
        assert answer.seconds < 0.5, answer  # the old delay is gone with the old route
    for answer in others:
        assert answer.status == 200 and answer.name == "ratings-v1", answer
    assert (after["DI"] - before["DI"], after["FI"] - before["FI"]) == (0, 3), (before, after)


def received_by(upstream: Process, key: str) -> dict:
    """What tests/servers/retry_upstream.py received for `key`: its count and each request's Host."""
    return json.loads(admin_get(upstream.port, f"/__stats?key={key}"))


def echoed_host(answer: Answer) -> str | None:
    """The Host an http_echo.py app received, from its answer."""
    try:
        return json.loads(answer.body)["headers"]["host"]
    except (ValueError, KeyError, TypeError):
        return None


def test_mirroring(mesh: Mesh, dataplane_kind: str):
    # v1 answers with its name and echoes the headers it got; v2 keeps what reached it, per key,
    # for the test to read from the app itself (its answers go nowhere: they are the copies').
    mesh.instance("httpbin", "v1", 8000, "http_echo.py", "--name", "httpbin-v1")
    v2 = mesh.instance("httpbin", "v2", 8000, "retry_upstream.py")
    apply(mesh.plane, HTTPBIN_SUBSETS + "---\n" + HTTPBIN_TO_V1)
    client = mesh.client(dataplane_kind)
    reached(client, "httpbin:8000", "/headers")
    envoy_holds(client, ("vs", "httpbin"), HTTPBIN_V1, HTTPBIN_V2)

    # Step 1, the task's first VirtualService: every request to v1, none to v2.
    unmirrored = [ask(client.outbound_port, "httpbin:8000", "/headers?key=unmirrored") for _ in range(10)]
    assert {(a.status, a.name) for a in unmirrored} == {(200, "httpbin-v1")}, unmirrored
    time.sleep(0.5)  # a copy, were one sent, would have arrived by now
    assert received_by(v2, "unmirrored")["count"] == 0, received_by(v2, "unmirrored")

    # Step 2: mirrored. The copies are fire-and-forget, so the test waits for them to arrive.
    apply(mesh.plane, HTTPBIN_SUBSETS + "---\n" + HTTPBIN_MIRRORED)

    def mirroring() -> bool | dict:
        ask(client.outbound_port, "httpbin:8000", "/headers?key=probe")
        return received_by(v2, "probe")["count"] > 0 or received_by(v2, "probe")

    wait_until(mirroring, 20, f"{dataplane_kind} client mirrors httpbin to v2", step=0.2)
    assert client.envoy is None or client.envoy.rejected_updates() == 0, client.envoy.stats()

    def copies_counted() -> int:
        """Requests the client sent on v2's cluster: here only copies, as no route leads there."""
        if client.envoy is not None:
            return client.envoy.counter(HTTPBIN_V2, "upstream_rq_total")
        return client.meshctl_series("meshctl_upstream_rq_total", HTTPBIN_V2)

    def copies_of(key: str, expected: int) -> dict:
        """v2's record of `key` once `expected` copies arrived, and a moment later (any extra one)."""

        def arrived() -> bool | dict:
            seen = received_by(v2, key)
            return seen["count"] >= expected or seen

        wait_until(arrived, 10, f"{expected} copies of {key} reach v2", step=0.05)
        time.sleep(0.3)
        return received_by(v2, key)

    time.sleep(0.3)  # the probe's copies still on their way are counted before the baseline
    before = copies_counted()
    # As in the task (curl http://httpbin:8000/headers), and once more with a Host without a port.
    with_port = [ask(client.outbound_port, "httpbin:8000", "/headers?key=mirrored") for _ in range(20)]
    bare = [ask(client.outbound_port, "httpbin", "/headers?key=bare") for _ in range(5)]
    mirrored, bare_copies = copies_of("mirrored", 20), copies_of("bare", 5)
    counted = copies_counted() - before
    print(f"{dataplane_kind}: without mirror v2 got {received_by(v2, 'unmirrored')['count']} of 10; mirrored: "
          f"client saw {sorted({(a.status, a.name) for a in with_port + bare})}, v1 got Hosts "
          f"{sorted({echoed_host(a) for a in with_port + bare}, key=str)}; v2 got "
          f"{mirrored['count']} copies of 20 with Hosts {sorted(set(mirrored['hosts']))} and "
          f"{bare_copies['count']} of 5 with Hosts {sorted(set(bare_copies['hosts']))}; "
          f"v2 cluster requests +{counted}")  # fmt: skip

    # The client sees v1's answers only, and v1 the request as it was sent.
    for answers, host in ((with_port, "httpbin:8000"), (bare, "httpbin")):
        assert {(a.status, a.name) for a in answers} == {(200, "httpbin-v1")}, answers
        assert {echoed_host(a) for a in answers} == {host}, answers
    # v2 gets one copy of each, its Host with "-shadow" after the host name and before any port:
    # Envoy's rule, which meshctl follows (README, fault injection and mirroring).
    assert (mirrored["count"], set(mirrored["hosts"])) == (20, {"httpbin-shadow:8000"}), mirrored
    assert (bare_copies["count"], set(bare_copies["hosts"])) == (5, {"httpbin-shadow"}), bare_copies
    assert counted == 25, counted
