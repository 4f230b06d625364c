"""The RateLimit resource (policy.meshctl.io/v1alpha1): what it accepts, what it refuses
by field (in the validator, and through `meshctl apply`: exit 2, nothing stored changes), and `meshctl
get ratelimit NAME -o yaml` showing it back as written."""

from __future__ import annotations

import pytest
import yaml
from helpers.control_plane import start_control_plane
from helpers.mesh import apply
from meshctl.resources import ValidationFailed, resolve_kind, validate_documents

LIMIT = """
apiVersion: policy.meshctl.io/v1alpha1
kind: RateLimit
metadata: {name: reviews-limit, namespace: default}
spec:
  host: reviews
  rules:
  - match: {path: {prefix: /api}, method: GET, headers: {x-user: {exact: jason}}}
    limit: {requests: 100, unit: second, burst: 20}
    scope: local
    shadow: false
    response: {status: 429, headers: {x-why: slow down}}
  - limit: {requests: 5, unit: minute}
    response: {status: 429, headers: {x-why: slow down}}
"""
WHERE = "RateLimit default/reviews-limit"


def refusal(text: str) -> list[str]:
    with pytest.raises(ValidationFailed) as caught:
        validate_documents(text)
    return [str(issue) for issue in caught.value.issues]


def test_the_issues_example_is_accepted_as_written():
    (resource,) = validate_documents(LIMIT)
    assert resource.body["spec"] == yaml.safe_load(LIMIT)["spec"]
    assert resolve_kind("rl").kind == resolve_kind("ratelimits").kind == "RateLimit"
    selected = LIMIT.replace("  host: reviews", "  selector: {matchLabels: {app: reviews}}")
    assert validate_documents(selected)[0].body["spec"]["selector"] == {"matchLabels": {"app": "reviews"}}


@pytest.mark.parametrize(
    ("change", "field", "reason"),
    [
        (("requests: 100", "requests: 0"), "spec.rules[0].limit.requests", "greater than or equal to 1"),
        (("requests: 100", "requests: -3"), "spec.rules[0].limit.requests", "greater than or equal to 1"),
        (("burst: 20", "burst: 0"), "spec.rules[0].limit.burst", "greater than or equal to 1"),
        (("burst: 20", "burst: -1"), "spec.rules[0].limit.burst", "greater than or equal to 1"),
        (("unit: second", "unit: day"), "spec.rules[0].limit.unit", "second"),
        (("requests: 100", "requests: '100'"), "spec.rules[0].limit.requests", "integer"),
        (("requests: 100", "requests: 4294967290"), "spec.rules[0].limit", "at most 4294967295"),
        (("  host: reviews", "  host: reviews\n  selector: {matchLabels: {app: reviews}}"), "spec", "exactly one of selector"),
        (("  host: reviews", ""), "spec", "exactly one of selector"),
        (("  host: reviews", "  host: '*.example.com'"), "spec.host", "wildcard"),
        ((LIMIT[LIMIT.index("  rules:"):], "  rules: []\n"), "spec.rules", "is empty"),
        (("prefix: /api", "exact: ''"), "spec.rules[0].match.path.exact", "matches no request"),
        (("prefix: /api", "prefix: api"), "spec.rules[0].match.path.prefix", "matches no request"),
        (("prefix: /api", "prefix: ''"), "spec.rules[0].match.path.prefix", "is empty"),
        (("method: GET", "method: ''"), "spec.rules[0].match.method", "matches no request"),
        (("method: GET", "method: get"), "spec.rules[0].match.method", "capitals"),
        (("x-user: {exact: jason}", "X-User: {exact: jason}"), "spec.rules[0].match.headers.X-User", "not a header name"),
        (("x-user: {exact: jason}", "x-user: {prefix: ''}"), "spec.rules[0].match.headers.x-user", "empty prefix"),
        (("x-user: {exact: jason}", "x-user: {}"), "spec.rules[0].match.headers.x-user", "exactly one of exact"),
        (("  rules:\n", "  failureModeDeny: true\n  rules:\n"), "spec.failureModeDeny", "global rules only"),
        (("scope: local", "scope: cluster"), "spec.rules[0].scope", "'local' or 'global'"),
        (("shadow: false", "shadow: maybe"), "spec.rules[0].shadow", "boolean"),
        (("x-why: slow down}}\n  - limit", "x-why: slow down}, body: too many}\n  - limit"),
         "spec.rules[0].response.body", "a custom body is not supported"),
        (("status: 429, headers: {x-why: slow down}}\n  - limit", "status: 200}\n  - limit"),
         "spec.rules[0].response.status", "not a 4xx or 5xx"),
        (("status: 429, headers: {x-why: slow down}}\n  - limit", "status: 429}\n  - limit"),
         "spec.rules[1].response", "differs from spec.rules[0].response"),
        (("    shadow: false", "    shadow: false\n    period: 1s"), "spec.rules[0].period", "unknown field"),
        (("method: GET,", "method: GET, sourcePrincipals: [cluster.local/ns/default/sa/productpage],"),
         "spec.rules[0].match.sourcePrincipals", "name callers by sourceNamespaces here"),
        (("method: GET,", "method: GET, sourceNamespaces: [],"), "spec.rules[0].match.sourceNamespaces", "is empty"),
        (("method: GET,", "method: GET, sourceNamespaces: [de*f*],"),
         "spec.rules[0].match.sourceNamespaces[0]", "* may stand only alone"),
        (("method: GET,", "method: GET, sourceNamespaces: [prod, ns/x],"),
         "spec.rules[0].match.sourceNamespaces[1]", "a namespace has no '/'"),
    ],
)  # fmt: skip
def test_bad_rate_limits_are_refused_naming_the_field(change, field, reason):
    text = LIMIT.replace(*change)
    assert text != LIMIT
    issues = refusal(text)
    assert any(issue.startswith(f"{WHERE}: {field}") and reason in issue for issue in issues), issues


SELECTED = LIMIT.replace("  host: reviews", "  selector: {matchLabels: {app: reviews}}")


def test_a_selector_rule_names_callers_by_principal_or_namespace_as_authorization_policy_does():
    text = SELECTED.replace("method: GET,", "method: GET, sourcePrincipals: [cluster.local/ns/default/sa/productpage, '*/sa/ratings'], "
                                            "sourceNamespaces: ['prod-*'],")  # fmt: skip
    (resource,) = validate_documents(text)
    match = resource.body["spec"]["rules"][0]["match"]
    assert match["sourcePrincipals"] == ["cluster.local/ns/default/sa/productpage", "*/sa/ratings"]
    assert match["sourceNamespaces"] == ["prod-*"]


@pytest.mark.parametrize(
    ("principals", "reason"),
    [
        ("[spiffe://cluster.local/ns/default/sa/productpage]", "without spiffe://"),
        ("['']", "is empty; write * for any"),
        ("['cluster.local/ns/*/sa/x']", "* may stand only alone"),
        ("['a;b']", "a character no SPIFFE ID has"),
    ],
)  # fmt: skip
def test_bad_source_principals_are_refused_naming_the_entry(principals, reason):
    issues = refusal(SELECTED.replace("method: GET,", f"method: GET, sourcePrincipals: {principals},"))
    assert any(issue.startswith(f"{WHERE}: spec.rules[0].match.sourcePrincipals[0]") and reason in issue
               for issue in issues), issues  # fmt: skip


def test_a_limit_for_a_host_nothing_serves_yet_is_accepted_as_a_fallback_would_be():
    # As a Fallback: a RateLimit may come before its service registers; it applies once it does.
    (resource,) = validate_documents(LIMIT.replace("host: reviews", "host: not-yet-deployed"))
    assert resource.body["spec"]["host"] == "not-yet-deployed"


def test_apply_get_and_refusals_through_the_control_plane(tmp_path):
    plane = start_control_plane(tmp_path / "plane", "--xds-port", "0")
    try:
        apply(plane, LIMIT)
        shown = plane.meshctl("get", "ratelimit", "reviews-limit", "-o", "yaml")
        assert shown.returncode == 0, shown.stderr
        body = yaml.safe_load(shown.stdout)
        assert (body["apiVersion"], body["kind"]) == ("policy.meshctl.io/v1alpha1", "RateLimit")
        assert body["spec"] == yaml.safe_load(LIMIT)["spec"]
        assert "reviews-limit" in plane.meshctl("get", "rl").stdout
        for change, field, reason in (
            (("requests: 100", "requests: 0"), "spec.rules[0].limit.requests", "greater than or equal to 1"),
            (("scope: local", "scope: cluster"), "spec.rules[0].scope", "'local' or 'global'"),
            (("  host: reviews", ""), "spec", "exactly one of selector"),
        ):
            done = plane.meshctl("apply", "-f", "-", stdin=LIMIT.replace(*change))
            assert done.returncode == 2, done.stderr
            assert f"{WHERE}: {field}" in done.stderr and reason in done.stderr, done.stderr
            assert plane.meshctl("get", "ratelimit", "reviews-limit", "-o", "yaml").stdout == shown.stdout
    finally:
        plane.stop()
