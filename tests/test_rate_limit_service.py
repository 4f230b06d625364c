"""The control plane's global rate limit service: a grpcio client holding a sidecar's certificate (from
`meshctl identity agent` and a join token) calls `envoy.service.ratelimit.v3.RateLimitService/
ShouldRateLimit` on a real `meshctl serve`'s xDS port, with the descriptors meshctl compiles for
global RateLimit rules (domain `meshctl`, `meshctl_rate_limit: NAMESPACE/NAME/INDEX`)."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
import yaml
from cryptography import x509
from envoy.service.ratelimit.v3 import rls_pb2
from helpers.control_plane import ControlPlane, start_control_plane
from helpers.envoy_client_sidecar import workload_certificate
from helpers.mesh import apply

METHOD = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"
OK, OVER_LIMIT = rls_pb2.RateLimitResponse.OK, rls_pb2.RateLimitResponse.OVER_LIMIT
QUOTA = (("x-meshctl-quota", "1"),)


def global_limit(requests: int, unit: str, name: str = "api-limit", **rule: object) -> str:
    extra = "".join(f"\n    {key}: {value}" for key, value in rule.items())
    return f"""
apiVersion: policy.meshctl.io/v1alpha1
kind: RateLimit
metadata: {{name: {name}}}
spec:
  host: reviews
  rules:
  - limit: {{requests: {requests}, unit: {unit}}}
    scope: global{extra}
    response: {{status: 429, headers: {{x-why: mesh-wide limit}}}}
"""


class Client:
    """ShouldRateLimit over grpcio, TLS verified against the mesh root, with or without a client
    certificate."""

    def __init__(self, plane: ControlPlane, certs: Path, with_certificate: bool = True) -> None:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=(certs / "root.pem").read_bytes(),
            private_key=(certs / "key.pem").read_bytes() if with_certificate else None,
            certificate_chain=(certs / "cert.pem").read_bytes() if with_certificate else None,
        )
        self.channel = grpc.secure_channel(plane.xds_address, credentials)
        self.call = self.channel.unary_unary(
            METHOD, request_serializer=rls_pb2.RateLimitRequest.SerializeToString,
            response_deserializer=rls_pb2.RateLimitResponse.FromString,
        )  # fmt: skip

    def ask(self, *rules: str, domain: str = "meshctl", hits: int = 0, quota: bool = False,
            descriptors: list[list[tuple[str, str]]] | None = None) -> rls_pb2.RateLimitResponse:  # fmt: skip
        request = rls_pb2.RateLimitRequest(domain=domain, hits_addend=hits)
        for entries in descriptors or [[("meshctl_rate_limit", rule)] for rule in rules]:
            descriptor = request.descriptors.add()
            for key, value in entries:
                descriptor.entries.add(key=key, value=value)
        return self.call(request, metadata=QUOTA if quota else None, timeout=10)

    def close(self) -> None:
        self.channel.close()


@pytest.fixture(scope="module")
def plane(tmp_path_factory):
    control_plane = start_control_plane(tmp_path_factory.mktemp("rls-plane"))
    yield control_plane
    control_plane.stop()


@pytest.fixture(scope="module")
def certs(plane, tmp_path_factory):
    return workload_certificate(plane, "productpage", tmp_path_factory.mktemp("rls-certs") / "certs")


@pytest.fixture
def client(plane, certs):
    client = Client(plane, certs)
    yield client
    client.close()


def wait_for_rule(plane: ControlPlane, name: str, serving: str, timeout: float = 10.0) -> None:
    """Until the service counts RateLimit `name`'s rule 0 against `serving` (e.g. "5 per hour"),
    as `meshctl get` shows: it follows the store, a moment behind."""
    deadline = time.monotonic() + timeout
    while (shown := last_minute(plane, name)[0]["serving"]) != serving:
        assert time.monotonic() < deadline, f"{name} is served as {shown}, not {serving}"
        time.sleep(0.1)


def away_from_window_end(unit_seconds: int, need: float) -> None:
    """Sleep into the next window if fewer than `need` seconds are left of this one (windows
    align to the epoch), so a test's calls fall in one window."""
    left = unit_seconds - time.time() % unit_seconds
    if left < need:
        time.sleep(left + 0.01)


def last_minute(plane: ControlPlane, name: str) -> list[dict]:
    """`meshctl get ratelimit NAME -o yaml`'s per global rule counts."""
    shown = plane.meshctl("get", "ratelimit", name, "-o", "yaml")
    assert shown.returncode == 0, shown.stderr
    return yaml.safe_load(shown.stdout)["status"]["globalRules"]


def codes(response: rls_pb2.RateLimitResponse) -> list[int]:
    return [status.code for status in response.statuses]


def test_ok_up_to_the_limit_then_over_limit_with_the_rules_headers(plane, client):
    apply(plane, global_limit(5, "hour", name="five-an-hour"))
    wait_for_rule(plane, "five-an-hour", "5 per hour")
    away_from_window_end(3600, 30)
    answers = [client.ask("default/five-an-hour/0") for _ in range(8)]
    assert [a.overall_code for a in answers] == [OK] * 5 + [OVER_LIMIT] * 3
    assert [a.statuses[0].limit_remaining for a in answers] == [4, 3, 2, 1, 0, 0, 0, 0]
    limit = answers[0].statuses[0].current_limit
    assert (limit.requests_per_unit, limit.unit) == (5, rls_pb2.RateLimitResponse.RateLimit.HOUR)
    assert [(h.key, h.value) for h in answers[-1].response_headers_to_add] == [("x-why", "mesh-wide limit")]
    assert not answers[0].response_headers_to_add
    # Never a quota without x-meshctl-quota: 1 (a real Envoy would ignore it).
    assert not any(a.statuses[0].HasField("quota") for a in answers)
    assert last_minute(plane, "five-an-hour") == [
        {"rule": 0, "serving": "5 per hour", "allowedLastMinute": 5, "limitedLastMinute": 3}]


def test_a_new_window_resets_the_count(plane, client):
    apply(plane, global_limit(3, "second", name="three-a-second"))
    wait_for_rule(plane, "three-a-second", "3 per second")
    time.sleep(1 - time.time() % 1 + 0.02)  # the start of a second
    first = [client.ask("default/three-a-second/0").overall_code for _ in range(4)]
    time.sleep(1 - time.time() % 1 + 0.02)
    second = [client.ask("default/three-a-second/0").overall_code for _ in range(4)]
    assert first == second == [OK] * 3 + [OVER_LIMIT]


def test_a_shadow_rule_counts_but_answers_ok(plane, client):
    apply(plane, global_limit(2, "hour", name="shadow-two", shadow="true"))
    wait_for_rule(plane, "shadow-two", "2 per hour")
    away_from_window_end(3600, 30)
    answers = [client.ask("default/shadow-two/0", quota=True) for _ in range(4)]
    assert [a.overall_code for a in answers] == [OK] * 4
    assert [a.statuses[0].limit_remaining for a in answers] == [1, 0, 0, 0]  # counted
    assert not any(a.statuses[0].HasField("quota") for a in answers)  # never a quota for shadow
    # What the rule would have done: two allowed, two limited.
    assert last_minute(plane, "shadow-two") == [
        {"rule": 0, "serving": "2 per hour", "allowedLastMinute": 2, "limitedLastMinute": 2}]


def test_unknown_domains_and_descriptors_are_ok_and_hits_addend_counts(plane, client):
    apply(plane, global_limit(5, "hour", name="hits"))
    wait_for_rule(plane, "hits", "5 per hour")
    away_from_window_end(3600, 30)
    assert client.ask("default/hits/0", domain="other").overall_code == OK
    unknown = client.ask(descriptors=[[("meshctl_rate_limit", "default/nothing/0")], [("remote_address", "10.0.0.1")]])
    assert unknown.overall_code == OK and codes(unknown) == [OK, OK]
    assert client.ask("default/hits/0", hits=3).statuses[0].limit_remaining == 2
    assert client.ask("default/hits/0", hits=3).overall_code == OVER_LIMIT  # 3 more do not fit: none counted
    assert client.ask("default/hits/0", hits=2).overall_code == OK
    assert client.ask("default/hits/0").overall_code == OVER_LIMIT


def test_a_request_is_counted_only_if_every_rule_it_names_admits_it(plane, client):
    apply(plane, global_limit(1, "hour", name="tight"))
    apply(plane, global_limit(3, "hour", name="loose"))
    wait_for_rule(plane, "tight", "1 per hour")
    wait_for_rule(plane, "loose", "3 per hour")
    away_from_window_end(3600, 30)
    both = [client.ask("default/tight/0", "default/loose/0") for _ in range(3)]
    assert [codes(a) for a in both] == [[OK, OK], [OVER_LIMIT, OK], [OVER_LIMIT, OK]]
    assert [a.overall_code for a in both] == [OK, OVER_LIMIT, OVER_LIMIT]
    # The refused requests took nothing from the loose rule: two of its three are left.
    assert [client.ask("default/loose/0").overall_code for _ in range(3)] == [OK, OK, OVER_LIMIT]


def test_quota_only_with_the_metadata_and_never_beyond_the_limit(plane, client):
    apply(plane, global_limit(10_000, "hour", name="big"))
    wait_for_rule(plane, "big", "10000 per hour")
    away_from_window_end(3600, 120)
    plain = client.ask("default/big/0")
    assert plain.overall_code == OK and not plain.statuses[0].HasField("quota")
    admitted, calls, grants = 1, 1, []
    while True:
        asked = time.time()
        answer = client.ask("default/big/0", quota=True)
        calls += 1
        if answer.overall_code == OVER_LIMIT:
            break
        status = answer.statuses[0]
        admitted += 1
        if status.HasField("quota"):
            grants.append(status.quota.requests)
            valid_until = status.quota.valid_until.ToNanoseconds() / 1e9
            assert asked - 1 < valid_until <= time.time() + 1.0  # short-lived
            admitted += status.quota.requests
        assert admitted + status.limit_remaining == 10_000  # a grant is counted when granted
        assert calls < 5_000
    print(f"{calls} calls, {len(grants)} grants, largest {max(grants)}")
    assert admitted == 10_000  # exactly the limit: quota never goes beyond it
    assert grants and max(grants) <= 10_000 // 200 and calls < 10_000 / 10


def test_applying_a_changed_limit_changes_it_live(plane, client):
    apply(plane, global_limit(2, "hour", name="changing"))
    wait_for_rule(plane, "changing", "2 per hour")
    away_from_window_end(3600, 30)
    assert [client.ask("default/changing/0").overall_code for _ in range(3)] == [OK, OK, OVER_LIMIT]
    apply(plane, global_limit(4, "hour", name="changing"))
    wait_for_rule(plane, "changing", "4 per hour")
    # What was counted stays counted: two more.
    assert [client.ask("default/changing/0").overall_code for _ in range(3)] == [OK, OK, OVER_LIMIT]
    assert plane.meshctl("delete", "ratelimit", "changing").returncode == 0
    deadline = time.monotonic() + 10
    while client.ask("default/changing/0").statuses[0].HasField("current_limit"):
        assert time.monotonic() < deadline, "the deleted rule is still served"
        time.sleep(0.05)
    assert client.ask("default/changing/0").overall_code == OK  # no rule: no limit


def test_a_caller_without_a_client_certificate_is_refused_as_for_ads(plane, certs):
    anonymous = Client(plane, certs, with_certificate=False)
    try:
        with pytest.raises(grpc.RpcError) as refused:
            anonymous.ask("default/five-an-hour/0")
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "client certificate" in refused.value.details()
    finally:
        anonymous.close()


def test_a_revoked_certificate_is_refused(plane, tmp_path):
    certs = workload_certificate(plane, "ratings", tmp_path / "certs")
    revoked = Client(plane, certs)
    try:
        assert revoked.ask("default/nothing/0").overall_code == OK  # accepted while valid
        serial = format(x509.load_pem_x509_certificate((certs / "cert.pem").read_bytes()).serial_number, "x")
        done = plane.meshctl("identity", "revoke", serial)
        assert done.returncode == 0, done.stderr
        with pytest.raises(grpc.RpcError) as refused:
            revoked.ask("default/nothing/0")
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "revoked" in refused.value.details()
    finally:
        revoked.close()


@pytest.mark.parametrize(
    ("change", "field", "reason"),
    [
        ([("requests: 5", "requests: 0")], "spec.rules[0].limit.requests", "greater than or equal to 1"),
        ([("requests: 5", "requests: -2")], "spec.rules[0].limit.requests", "greater than or equal to 1"),
        ([("unit: hour", "unit: day")], "spec.rules[0].limit.unit", "second"),
        ([("scope: global", "scope: mesh")], "spec.rules[0].scope", "'local' or 'global'"),
        ([("scope: global", "scope: local"), ("  rules:", "  failureModeDeny: true\n  rules:")],
         "spec.failureModeDeny", "global rules only"),
        ([("  rules:", "  failureModeDeny: maybe\n  rules:")], "spec.failureModeDeny", "boolean"),
    ],
)  # fmt: skip
def test_bad_global_limits_are_refused_by_field_and_nothing_changes(plane, change, field, reason):
    good = global_limit(5, "hour", name="refusals")
    apply(plane, good)
    before = plane.meshctl("get", "ratelimit", "refusals", "-o", "yaml").stdout
    bad = good
    for old, new in change:
        bad = bad.replace(old, new)
    assert bad != good
    done = plane.meshctl("apply", "-f", "-", stdin=bad)
    assert done.returncode == 2, done.stderr
    assert f"RateLimit default/refusals: {field}" in done.stderr and reason in done.stderr, done.stderr
    assert plane.meshctl("get", "ratelimit", "refusals", "-o", "yaml").stdout == before
    assert yaml.safe_load(before)["spec"]["rules"][0]["scope"] == "global"
