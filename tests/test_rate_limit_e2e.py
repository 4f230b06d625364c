"""RateLimit end to end: `meshctl serve` compiles it, a client sidecar gets it over ADS, and a burst of
requests through that sidecar shows the user what the limit promises; on a real Envoy 1.40 (the
reference) and on `meshctl run`. The upstream is registered as a plain instance: the limit under test is the
calling sidecar's (a `host` RateLimit)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import pytest
from helpers.control_plane import start_control_plane
from helpers.envoy_sidecar import start_envoy_sidecar
from helpers.mesh import MeshSidecar, apply, wait_until
from helpers.mesh_client import MeshClient
from helpers.ports import free_port
from helpers.procs import start_upstream
from test_istio_tasks import Mesh, reached

HOST = "reviews:9080"


def rate_limit(rules: str) -> str:
    return f"""
apiVersion: policy.meshctl.io/v1alpha1
kind: RateLimit
metadata: {{name: reviews-limit}}
spec:
  host: reviews
  rules:
{rules}"""


FIVE_A_MINUTE = rate_limit("""
  - limit: {requests: 5, unit: minute}
    response: {status: 429, headers: {x-why: slow down}}
""")
FIVE_A_MINUTE_SHADOW = rate_limit("""
  - limit: {requests: 5, unit: minute}
    shadow: true
""")
TWO_A_MINUTE_FOR_JASON = rate_limit("""
  - match: {headers: {x-user: {exact: jason}}}
    limit: {requests: 2, unit: minute}
""")
JASON_AND_EVERYONE = rate_limit("""
  - match: {headers: {x-user: {exact: jason}}}
    limit: {requests: 2, unit: minute}
  - limit: {requests: 4, unit: minute}
  - match: {path: {exact: /audit}, method: GET}
    limit: {requests: 1, unit: minute}
    shadow: true
""")


@pytest.fixture
def mesh(tmp_path):
    mesh = Mesh(start_control_plane(tmp_path / "plane"), tmp_path)
    yield mesh
    mesh.stop()


@dataclass
class Reply:
    status: int
    headers: dict[str, str] = field(default_factory=dict)


def get(client: MeshClient, headers: dict[str, str] | None = None, path: str = "/") -> Reply:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(f"http://127.0.0.1:{client.outbound_port}{path}",
                                     headers={"Host": HOST, **(headers or {})})  # fmt: skip
    try:
        with opener.open(request, timeout=10) as response:
            response.read()
            return Reply(response.status, {k.lower(): v for k, v in response.headers.items()})
    except urllib.error.HTTPError as error:
        error.read()
        return Reply(error.code, {k.lower(): v for k, v in error.headers.items()})
    except OSError as error:  # not listening (yet), reset: no status
        return Reply(0, {"error": f"{type(error).__name__}: {error}"})


def limited(mesh: Mesh, kind: str, text: str) -> MeshClient:
    """A client sidecar of `kind` that reaches reviews, then holds the RateLimit `text` (its ACK
    recorded by the plane; a NACK fails the test with the sidecar's reason)."""
    mesh.instance("reviews", "v1", 9080, "http_echo.py", "--name", "reviews-v1")
    client = mesh.client(kind)
    reached(client, HOST)
    apply(mesh.plane, text)
    holds(mesh)
    return client


def holds(mesh: Mesh) -> None:
    """Until every sidecar the plane reports on has answered the RateLimit's current version; none
    may have refused it."""
    shown: dict = {}

    def acknowledged() -> bool | dict:
        nonlocal shown
        shown = json.loads(mesh.plane.meshctl("get", "ratelimit", "reviews-limit", "-o", "json").stdout)
        version = int(shown["metadata"]["resourceVersion"])
        sidecars = shown.get("status", {}).get("sidecars", {}).values()
        return bool(sidecars) and all(s["version"] == version and s["state"] != "pending" for s in sidecars) or shown

    wait_until(acknowledged, 20, "the client sidecar answers the RateLimit's config", step=0.3)
    rejected = {node: s for node, s in shown["status"]["sidecars"].items() if s["state"] == "rejected"}
    assert not rejected, rejected
    time.sleep(1.0)  # an ACKed listener change still takes a moment to serve new connections


def envoy_counter(client: MeshClient, name: str) -> int | None:
    return None if client.envoy is None else client.envoy.stats().get(name, 0)


def test_a_host_limit_of_five_a_minute_lets_five_of_a_burst_of_twelve_through(mesh, dataplane_kind):
    client = limited(mesh, dataplane_kind, FIVE_A_MINUTE)
    replies = [get(client) for _ in range(12)]
    print(f"{dataplane_kind}: {[r.status for r in replies]}")
    assert [r.status for r in replies] == [200] * 5 + [429] * 7
    assert all(r.headers.get("x-why") == "slow down" for r in replies[5:]), replies[5:]
    assert all("x-why" not in r.headers for r in replies[:5]), replies[:5]
    if client.envoy is not None:
        assert envoy_counter(client, "local_rate_limit.http_local_rate_limit.rate_limited") == 7


def test_a_shadow_limit_counts_but_lets_everything_through(mesh, dataplane_kind):
    client = limited(mesh, dataplane_kind, FIVE_A_MINUTE_SHADOW)
    replies = [get(client) for _ in range(12)]
    print(f"{dataplane_kind}: {[r.status for r in replies]}")
    assert [r.status for r in replies] == [200] * 12
    if client.envoy is not None:
        # Envoy counts what it would have limited, in the shadow instance's stats.
        assert envoy_counter(client, "local_rate_limit_shadow.http_local_rate_limit.rate_limited") == 7


def test_a_rule_matching_a_header_limits_only_those_requests(mesh, dataplane_kind):
    client = limited(mesh, dataplane_kind, TWO_A_MINUTE_FOR_JASON)
    others = [get(client).status for _ in range(6)]
    jason = [get(client, {"x-user": "jason"}).status for _ in range(6)]
    after = [get(client).status for _ in range(3)]
    print(f"{dataplane_kind}: others {others}, jason {jason}, others after {after}")
    assert jason == [200] * 2 + [429] * 4
    assert others == [200] * 6 and after == [200] * 3


def test_a_request_matching_two_rules_needs_a_token_from_each_and_shadow_rules_beside_them_limit_nothing(
        mesh, dataplane_kind):  # fmt: skip
    client = limited(mesh, dataplane_kind, JASON_AND_EVERYONE)
    jason = [get(client, {"x-user": "jason"}).status for _ in range(3)]
    # Everyone's bucket (4) gave jason's two passing requests a token each; the refused third took none.
    others = [get(client).status for _ in range(3)]
    print(f"{dataplane_kind}: jason {jason}, others {others}")
    assert jason == [200, 200, 429]
    assert others == [200, 200, 429]
    # Everyone's bucket is empty: /audit is refused by the enforced rule. The shadow rule (1 a
    # minute, in the second filter instance, before the enforced one) counts the second as over its
    # limit: its exact path matches with a query string too, as a route's path match would.
    before = envoy_counter(client, "local_rate_limit_shadow.http_local_rate_limit.rate_limited")
    audits = [get(client, path=path).status for path in ("/audit", "/audit?from=test")]
    assert audits == [429, 429]
    if client.envoy is not None:
        assert envoy_counter(client, "local_rate_limit_shadow.http_local_rate_limit.rate_limited") - before == 1


def test_a_selector_limits_the_inbound_traffic_of_the_workloads_it_picks(mesh, dataplane_kind, tmp_path):
    """reviews v1 behind a sidecar of the data plane under test, limited on its inbound side by
    `selector: {matchLabels: {app: reviews}}`: 3 a minute, answered 503 with x-why."""
    inbound_port = free_port()
    app = start_upstream("http_echo.py", tmp_path, "--name", "reviews-v1")
    mesh.upstreams.append(app)
    if dataplane_kind == "envoy":
        server = start_envoy_sidecar(mesh.plane, tmp_path, "reviews", version="v1", servicePort=9080,
                                     appPort=app.port, inboundPort=inbound_port, ready=True)  # fmt: skip
        stop = server.stop
    else:
        sidecar = MeshSidecar(mesh.plane.env, tmp_path, "reviews", "--version", "v1", "--app-port", str(app.port),
                              "--service-port", "9080", "--inbound-port", str(inbound_port))  # fmt: skip
        stop = sidecar.stop
    try:
        class Direct:  # callers reach the instance at its inbound port, as other sidecars do
            outbound_port = inbound_port

        wait_until(lambda: get(Direct).status == 200, 30, "reviews v1's inbound listener answers", step=0.3)
        apply(mesh.plane, """
apiVersion: policy.meshctl.io/v1alpha1
kind: RateLimit
metadata: {name: reviews-limit}
spec:
  selector: {matchLabels: {app: reviews}}
  rules:
  - limit: {requests: 3, unit: minute}
    response: {status: 503, headers: {x-why: busy}}
""")
        holds(mesh)
        replies = [get(Direct) for _ in range(6)]
        print(f"{dataplane_kind}: {[(r.status, r.headers.get('x-why')) for r in replies]}")
        assert [(r.status, r.headers.get("x-why")) for r in replies] == [(200, None)] * 3 + [(503, "busy")] * 3
    finally:
        stop()
