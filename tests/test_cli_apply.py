"""`meshctl apply/get/delete` against a real `meshctl serve`: round trips, refusals, auth, versions."""

from __future__ import annotations

import http.client
import itertools
import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.control_plane import ControlPlane, start_control_plane

_namespaces = itertools.count()


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> ControlPlane:
    control_plane = start_control_plane(tmp_path_factory.mktemp("control-plane"))
    yield control_plane
    control_plane.stop()


@pytest.fixture
def ns() -> str:
    """A namespace of its own per test: the tests share one control plane."""
    return f"test-{next(_namespaces)}"


def rule(ns: str, subsets: tuple[str, ...] = ("v1", "v2"), name: str = "reviews") -> str:
    listed = "".join(f"\n  - name: {s}\n    labels: {{version: {s}}}" for s in subsets)
    return f"""
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {name}, namespace: {ns}}}
spec:
  host: reviews
  trafficPolicy: {{loadBalancer: {{simple: LEAST_REQUEST}}}}
  subsets:{listed}
"""


def service(
    ns: str, weights: dict[str, int] | None = None, extra: str = "", match: str = ""
) -> str:
    weights = weights if weights is not None else {"v1": 90, "v2": 10}
    routes = "".join(
        f"\n    - destination: {{host: reviews, subset: {s}}}\n      weight: {w}"
        for s, w in weights.items()
    )
    return f"""
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {{name: reviews, namespace: {ns}}}
spec:
  hosts: [reviews]
  http:
  - {match}route:{routes}{extra}
"""


def resources(plane: ControlPlane, kind: str, ns: str) -> list[dict]:
    result = plane.meshctl("get", kind, "-n", ns, "-o", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["items"]


def test_apply_get_delete_round_trip(plane: ControlPlane, ns: str) -> None:
    applied = plane.meshctl("apply", "-f", "-", stdin=rule(ns) + "---" + service(ns))
    assert applied.returncode == 0, applied.stderr
    assert f"DestinationRule {ns}/reviews created" in applied.stdout
    assert f"VirtualService {ns}/reviews created" in applied.stdout

    table = plane.meshctl("get", "vs", "-n", ns)
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()
    assert header.split()[:6] == ["KIND", "NAMESPACE", "NAME", "HOSTS", "VERSION", "STATUS"]
    assert row.split()[:3] == ["VirtualService", ns, "reviews"]
    assert "no sidecar has reported" in row

    [shown] = resources(plane, "virtualservices", ns)
    assert shown["spec"]["http"][0]["route"][1] == {
        "destination": {"host": "reviews", "subset": "v2"},
        "weight": 10,
    }
    assert shown["status"] == {"sidecars": {}, "notEnforced": []}
    first_version = int(shown["metadata"]["resourceVersion"])

    again = plane.meshctl("apply", "-f", "-", stdin=service(ns))
    assert "unchanged" in again.stdout, again.stderr
    changed = plane.meshctl("apply", "-f", "-", stdin=service(ns, {"v1": 50, "v2": 50}))
    assert f"VirtualService {ns}/reviews updated" in changed.stdout, changed.stderr
    [shown] = resources(plane, "VirtualService", ns)
    assert int(shown["metadata"]["resourceVersion"]) > first_version
    assert [d["weight"] for d in shown["spec"]["http"][0]["route"]] == [50, 50]

    one = plane.meshctl("get", "dr", "reviews", "-n", ns, "-o", "yaml")
    assert one.returncode == 0 and "simple: LEAST_REQUEST" in one.stdout

    assert plane.meshctl("delete", "vs", "reviews", "-n", ns).returncode == 0
    assert plane.meshctl("delete", "destinationrule", "reviews", "-n", ns).returncode == 0
    gone = plane.meshctl("get", "vs", "reviews", "-n", ns)
    assert gone.returncode == 4 and f"VirtualService {ns}/reviews not found" in gone.stderr


# (name, YAML given the namespace, what stderr must name: resource, field, reason)
INVALID = [
    (
        "weights",
        lambda ns: rule(ns) + "---" + service(ns, {"v1": 80, "v2": 10}),
        [
            "VirtualService {ns}/reviews",
            "spec.http[0].route",
            "weights sum to 90, they must sum to 100",
        ],
    ),
    (
        "subset-not-defined",
        lambda ns: rule(ns, ("v1",)) + "---" + service(ns),
        [
            "VirtualService {ns}/reviews",
            "spec.http[0].route[1].destination.subset",
            "subset 'v2' is not defined",
        ],
    ),
    (
        "no-destination-rule",
        lambda ns: service(ns),
        [
            "VirtualService {ns}/reviews",
            "route[0].destination.subset",
            "no DestinationRule has host 'reviews'",
        ],
    ),
    (
        "unknown-field",
        lambda ns: rule(ns) + "---" + service(ns).replace("destination:", "destinaton:", 1),
        [
            "VirtualService {ns}/reviews",
            "spec.http[0].route[0].destinaton",
            "unknown field; did you mean 'destination'?",
        ],
    ),
    (
        "unsupported-field",
        lambda ns: rule(ns) + "---" + service(ns, extra="\n    corsPolicy: {allowOrigins: [{exact: x}]}"),
        ["VirtualService {ns}/reviews", "spec.http[0].corsPolicy", "does not support it yet"],
    ),
    (
        "fault-percentage-above-100",
        lambda ns: rule(ns) + "---" + service(ns, extra="\n    fault: {abort: {httpStatus: 500, percentage: {value: 101}}}"),
        ["VirtualService {ns}/reviews", "spec.http[0].fault.abort.percentage.value", "less than or equal to 100"],
    ),
    (
        "fault-http-status-99",
        lambda ns: rule(ns) + "---" + service(ns, extra="\n    fault: {abort: {httpStatus: 99}}"),
        ["VirtualService {ns}/reviews", "spec.http[0].fault.abort.httpStatus", "greater than or equal to 200"],
    ),
    (
        "fault-http-status-600",
        lambda ns: rule(ns) + "---" + service(ns, extra="\n    fault: {abort: {httpStatus: 600}}"),
        ["VirtualService {ns}/reviews", "spec.http[0].fault.abort.httpStatus", "less than or equal to 599"],
    ),
    (
        "fault-unknown-grpc-status",
        lambda ns: rule(ns) + "---" + service(ns, extra="\n    fault: {abort: {grpcStatus: NOT_A_STATUS}}"),
        ["VirtualService {ns}/reviews", "spec.http[0].fault.abort.grpcStatus", "'NOT_A_STATUS' is not a gRPC status"],
    ),
    (
        "fault-negative-delay",
        lambda ns: rule(ns) + "---" + service(ns, extra="\n    fault: {delay: {fixedDelay: -1s, percentage: {value: 10}}}"),
        ["VirtualService {ns}/reviews", "spec.http[0].fault.delay.fixedDelay", "'-1s' is not a duration"],
    ),
    (
        "fault-without-delay-or-abort",
        lambda ns: rule(ns) + "---" + service(ns, extra="\n    fault: {}"),
        ["VirtualService {ns}/reviews", "spec.http[0].fault", "a fault needs a delay or an abort"],
    ),
    (
        "mirror-and-mirrors",
        lambda ns: rule(ns) + "---" + service(ns, extra="\n    mirror: {host: reviews, subset: v2}"
                                              "\n    mirrors: [{destination: {host: reviews, subset: v1}}]"),
        ["VirtualService {ns}/reviews", "spec.http[0].mirrors", "mirror and mirrors cannot both be set"],
    ),
    (
        "mirror-percentage-above-100",
        lambda ns: rule(ns) + "---" + service(ns, extra="\n    mirror: {host: reviews, subset: v2}\n    mirrorPercentage: {value: 150}"),
        ["VirtualService {ns}/reviews", "spec.http[0].mirrorPercentage.value", "less than or equal to 100"],
    ),
    (
        "mirror-to-an-unknown-subset",
        lambda ns: rule(ns) + "---" + service(ns, extra="\n    mirror: {host: reviews, subset: v9}"),
        ["VirtualService {ns}/reviews", "spec.http[0].mirror.subset", "subset 'v9' is not defined"],
    ),
    (
        "mirrors-to-an-unknown-subset",
        lambda ns: rule(ns) + "---" + service(ns, extra="\n    mirrors: [{destination: {host: reviews, subset: v9}, percentage: {value: 5}}]"),
        ["VirtualService {ns}/reviews", "spec.http[0].mirrors[0].destination.subset", "subset 'v9' is not defined"],
    ),
    (
        "bad-regex",
        lambda ns: (
            rule(ns) + "---" + service(ns, match="match: [{uri: {regex: '/api/(v1'}}]\n    ")
        ),
        [
            "VirtualService {ns}/reviews",
            "spec.http[0].match[0].uri.regex",
            "invalid regular expression",
        ],
    ),
    (
        "malformed-yaml",
        lambda ns: rule(ns) + "---\nkind: VirtualService\nspec: {hosts: [reviews\n",
        ["document 2", "malformed YAML at line"],
    ),
    (
        "max-ejection-percent",
        lambda ns: rule(ns).replace("{loadBalancer: {simple: LEAST_REQUEST}}",
                                    "{outlierDetection: {consecutive5xxErrors: 3, maxEjectionPercent: 101}}") + "---" + service(ns),
        ["DestinationRule {ns}/reviews", "spec.trafficPolicy.outlierDetection.maxEjectionPercent",
         "less than or equal to 100"],
    ),
    (
        "negative-duration",
        lambda ns: rule(ns) + "---" + service(ns, extra="\n    retries: {attempts: 2, perTryTimeout: -1s}"),
        ["VirtualService {ns}/reviews", "spec.http[0].retries.perTryTimeout", "'-1s' is not a duration"],
    ),
    (
        "per-try-timeout-beyond-the-route-timeout",
        lambda ns: rule(ns) + "---" + service(ns, extra="\n    timeout: 1s\n    retries: {attempts: 2, perTryTimeout: 2s}"),
        ["VirtualService {ns}/reviews", "spec.http[0].retries.perTryTimeout",
         "longer than the route's timeout 1s", "no retry would ever start"],
    ),
    (
        "unknown-retry-condition",
        lambda ns: rule(ns) + "---" + service(ns, extra="\n    retries: {attempts: 2, retryOn: '5xx,sometimes'}"),
        ["VirtualService {ns}/reviews", "spec.http[0].retries.retryOn", "'sometimes' is not a retry condition"],
    ),
    (
        "connection-pool-negative",
        lambda ns: rule(ns).replace("{loadBalancer: {simple: LEAST_REQUEST}}",
                                    "{connectionPool: {http: {http1MaxPendingRequests: -1}}}") + "---" + service(ns),
        ["DestinationRule {ns}/reviews", "spec.trafficPolicy.connectionPool.http.http1MaxPendingRequests",
         "greater than or equal to 0"],
    ),
    (
        "string-weight",
        lambda ns: rule(ns) + "---" + service(ns).replace("weight: 90", "weight: '90'"),
        ["VirtualService {ns}/reviews", "spec.http[0].route[0].weight", "valid integer (got '90')"],
    ),
]


@pytest.mark.parametrize(
    "make, expected", [case[1:] for case in INVALID], ids=[case[0] for case in INVALID]
)
def test_invalid_apply_exits_2_names_resource_field_reason_and_stores_nothing(
    plane: ControlPlane, ns: str, make, expected: list[str]
) -> None:
    refused = plane.meshctl("apply", "-f", "-", stdin=make(ns))
    assert refused.returncode == 2, (refused.stdout, refused.stderr)
    assert "nothing was changed" in refused.stderr
    for text in expected:
        assert text.format(ns=ns) in refused.stderr, refused.stderr
    # All or nothing: the valid DestinationRule in the same file was not stored either.
    assert resources(plane, "dr", ns) == [] and resources(plane, "vs", ns) == []


def test_subset_check_sees_the_store_and_guards_deletes(plane: ControlPlane, ns: str) -> None:
    assert plane.meshctl("apply", "-f", "-", stdin=rule(ns)).returncode == 0
    # The DestinationRule is already stored; this batch holds only the VirtualService.
    refused = plane.meshctl("apply", "-f", "-", stdin=service(ns, {"v1": 50, "v3": 50}))
    assert refused.returncode == 2
    assert f"DestinationRule {ns}/reviews defines v1, v2" in refused.stderr
    assert plane.meshctl("apply", "-f", "-", stdin=service(ns)).returncode == 0
    # Deleting the rule would strand the route's subsets: refused, and the rule stays.
    kept = plane.meshctl("delete", "dr", "reviews", "-n", ns)
    assert kept.returncode == 2 and f"VirtualService {ns}/reviews" in kept.stderr
    # Dropping subset v2 from the rule is refused the same way.
    shrink = plane.meshctl("apply", "-f", "-", stdin=rule(ns, ("v1",)))
    assert shrink.returncode == 2 and "subset 'v2' is not defined" in shrink.stderr
    assert len(resources(plane, "dr", ns)[0]["spec"]["subsets"]) == 2


def test_stale_update_is_refused(plane: ControlPlane, ns: str) -> None:
    assert plane.meshctl("apply", "-f", "-", stdin=rule(ns) + "---" + service(ns)).returncode == 0
    exported = plane.meshctl("get", "vs", "reviews", "-n", ns, "-o", "yaml").stdout
    assert "resourceVersion:" in exported
    # Someone else changes the route after our export...
    assert (
        plane.meshctl("apply", "-f", "-", stdin=service(ns, {"v1": 50, "v2": 50})).returncode == 0
    )
    # ...so applying our edit of the old version is refused, and their change stays.
    stale = plane.meshctl(
        "apply",
        "-f",
        "-",
        stdin=exported.replace("weight: 90", "weight: 70").replace("weight: 10", "weight: 30"),
    )
    assert stale.returncode == 3, stale.stderr
    assert f"VirtualService {ns}/reviews: the update was made against version" in stale.stderr
    [current] = resources(plane, "vs", ns)
    assert [d["weight"] for d in current["spec"]["http"][0]["route"]] == [50, 50]
    # Re-exported, the edit applies: `get -o yaml` output is valid apply input (status ignored).
    fresh = plane.meshctl("get", "vs", "reviews", "-n", ns, "-o", "yaml").stdout
    assert (
        plane.meshctl(
            "apply",
            "-f",
            "-",
            stdin=fresh.replace("weight: 50", "weight: 25", 1).replace("weight: 50", "weight: 75"),
        ).returncode
        == 0
    )
    stale_delete = plane.meshctl("delete", "vs", "reviews", "-n", ns, "--resource-version", "1")
    assert stale_delete.returncode == 3


def test_fields_kept_for_later_are_stored_and_shown_as_not_enforced(
    plane: ControlPlane, ns: str
) -> None:
    text = f"""
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: vm-1, namespace: {ns}}}
spec: {{address: 10.0.0.1, serviceAccount: legacy}}
"""
    applied = plane.meshctl("apply", "-f", "-", stdin=text)
    assert applied.returncode == 0, applied.stderr
    assert f"WorkloadEntry {ns}/vm-1: spec.serviceAccount: stored, not yet enforced" in applied.stderr
    [shown] = resources(plane, "workloadentry", ns)
    assert shown["spec"]["serviceAccount"] == "legacy"
    assert shown["status"]["notEnforced"] == ["spec.serviceAccount"]
    assert "not yet enforced: spec.serviceAccount" in plane.meshctl("get", "workloadentry", "-n", ns).stdout


def test_resilience_settings_are_applied_as_written_and_enforced(plane: ControlPlane, ns: str) -> None:
    policy = ("{connectionPool: {tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1, maxRetries: 3}},"
              " outlierDetection: {consecutive5xxErrors: 3, interval: 1s, baseEjectionTime: 30s, maxEjectionPercent: 50}}")
    text = (rule(ns).replace("{loadBalancer: {simple: LEAST_REQUEST}}", policy) + "---"
            + service(ns, extra="\n    retries: {attempts: 3, perTryTimeout: 2s, retryOn: 'gateway-error,connect-failure,503'}"))
    applied = plane.meshctl("apply", "-f", "-", stdin=text)
    assert applied.returncode == 0, applied.stderr
    assert "not yet enforced" not in applied.stderr
    [shown] = resources(plane, "vs", ns)
    assert shown["spec"]["http"][0]["retries"] == {"attempts": 3, "perTryTimeout": "2s", "retryOn": "gateway-error,connect-failure,503"}
    assert shown["status"]["notEnforced"] == []
    [rule_shown] = resources(plane, "dr", ns)
    assert rule_shown["spec"]["trafficPolicy"]["outlierDetection"]["consecutive5xxErrors"] == 3


def test_fault_and_mirror_are_applied_as_written_and_enforced(plane: ControlPlane, ns: str) -> None:
    fault = "{delay: {percentage: {value: 100.0}, fixedDelay: 7s}, abort: {grpcStatus: UNAVAILABLE, percentage: {value: 0.5}}}"
    text = rule(ns) + "---" + service(
        ns, extra=f"\n    fault: {fault}\n    mirror: {{host: reviews, subset: v2}}\n    mirrorPercentage: {{value: 50}}"
    )
    applied = plane.meshctl("apply", "-f", "-", stdin=text)
    assert applied.returncode == 0, applied.stderr
    assert "not yet enforced" not in applied.stderr
    [shown] = resources(plane, "vs", ns)
    route = shown["spec"]["http"][0]
    assert route["fault"] == {"delay": {"percentage": {"value": 100.0}, "fixedDelay": "7s"},
                              "abort": {"grpcStatus": "UNAVAILABLE", "percentage": {"value": 0.5}}}  # fmt: skip
    assert route["mirror"] == {"host": "reviews", "subset": "v2"} and route["mirrorPercentage"] == {"value": 50}
    assert shown["status"]["notEnforced"] == []


def test_wrong_or_missing_token_is_refused_and_changes_nothing(
    plane: ControlPlane, ns: str
) -> None:
    wrong = plane.meshctl("apply", "-f", "-", "--token", "not-the-token", stdin=rule(ns))
    assert wrong.returncode == 1 and "missing or wrong API token" in wrong.stderr
    env = {**plane.env, "MESHCTL_TOKEN": "also-wrong"}
    assert plane.meshctl("delete", "dr", "reviews", "-n", ns, env=env).returncode == 1
    host, port = plane.address.split(":")
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"}):
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        connection.request("POST", "/v1/apply", body=rule(ns).encode(), headers=headers)
        response = connection.getresponse()
        assert response.status == 401
        assert json.loads(response.read())["error"]["code"] == "unauthorized"
        connection.close()
    assert resources(plane, "dr", ns) == []


def test_token_and_store_are_private_to_the_user(plane: ControlPlane) -> None:
    assert stat.S_IMODE(plane.token_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(plane.store_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(plane.token_path.parent.stat().st_mode) == 0o700
    assert len(plane.token_path.read_text().strip()) >= 32


def test_second_server_on_the_same_store_is_refused(plane: ControlPlane) -> None:
    second = subprocess.run(
        [sys.executable, "-m", "meshctl", "serve", "--api-port", "0"],
        env={**plane.env}, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert second.returncode == 1 and "in use by another `meshctl serve`" in second.stderr


def test_unreachable_control_plane_is_a_clear_error(plane: ControlPlane, tmp_path: Path) -> None:
    result = plane.meshctl("get", "vs", "--control-plane", "127.0.0.1:1")
    assert (
        result.returncode == 1 and "cannot reach the control plane at 127.0.0.1:1" in result.stderr
    )


def test_apply_of_a_missing_file_exits_2(plane: ControlPlane, tmp_path: Path) -> None:
    result = plane.meshctl("apply", "-f", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2 and "cannot read" in result.stderr
