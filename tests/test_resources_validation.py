"""Resource validation without a server: every refusal names the resource, the field and the reason."""

from __future__ import annotations

import pytest

from meshctl.resources import ValidationFailed, check_references, resolve_kind, validate_documents
from meshctl.resources.common import duration_seconds
from meshctl.resources.hosts import canonical_host

GOOD = """
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  gateways: [mesh]
  http:
  - name: jason
    match:
    - headers: {end-user: {exact: jason}}
      uri: {prefix: /api}
      method: {regex: "GET|HEAD"}
    route: [{destination: {host: reviews, subset: v3, port: {number: 9080}}}]
    rewrite: {uri: /v2/api, authority: reviews.internal}
    headers:
      request: {set: {x-canary: "1"}, remove: [x-debug]}
      response: {add: {x-served-by: mesh}}
    timeout: 1.5s
  - match: [{uri: {exact: /old}}]
    redirect: {uri: /new, authority: example.com, redirectCode: 308}
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 75}
    - {destination: {host: reviews, subset: v2}, weight: 25}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews.shop.svc.cluster.local
  trafficPolicy: {loadBalancer: {simple: RANDOM}, outlierDetection: {consecutive5xxErrors: 5}}
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}, trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}}
  - {name: v3, labels: {version: v3}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: payments}
spec:
  hosts: [payments.example.com]
  ports: [{number: 443, name: https, protocol: TLS}]
  location: MESH_EXTERNAL
  resolution: STATIC
  endpoints: [{address: 10.0.0.7, ports: {https: 8443}}]
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm-1}
spec: {address: 10.0.0.9, labels: {app: ratings, version: v1}, serviceAccount: ratings}
"""


def refusal(text: str) -> list[str]:
    with pytest.raises(ValidationFailed) as caught:
        validate_documents(text)
    return [str(issue) for issue in caught.value.issues]


def test_a_full_istio_file_is_accepted_as_written() -> None:
    resources = validate_documents(GOOD)
    assert [str(r.ref) for r in resources] == [
        "VirtualService shop/reviews", "DestinationRule shop/reviews",
        "ServiceEntry default/payments", "WorkloadEntry default/vm-1"]  # fmt: skip
    service = resources[0].body
    # What comes back is what was written: no defaults added, camelCase kept.
    assert service["spec"]["http"][1]["redirect"] == {
        "uri": "/new",
        "authority": "example.com",
        "redirectCode": 308,
    }
    assert "weight" not in service["spec"]["http"][0]["route"][0]
    assert resources[1].not_enforced == ()  # outlierDetection is enforced
    assert resources[3].not_enforced == ("spec.serviceAccount",)
    # Short names resolve in the resource's namespace, so `reviews` finds the FQDN rule.
    assert check_references([r.body for r in resources]) == []


VS = """apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: r}}
spec:
  hosts: [r]
  http:
  - {http}
"""

CASES = {
    "weights": (
        "route: [{destination: {host: r}, weight: 60}, {destination: {host: r}, weight: 30}]",
        "spec.http[0].route: weights sum to 90, they must sum to 100 (r=60, r=30)",
    ),
    "single-weight": ("route: [{destination: {host: r}, weight: 50}]", "weights sum to 50"),
    "unknown": (
        "route: [{destination: {host: r, subsett: a}}]",
        "spec.http[0].route[0].destination.subsett: unknown field; did you mean 'subset'?",
    ),
    "unsupported": (
        "route: [{destination: {host: r}}]\n    corsPolicy: {allowOrigins: [{exact: x}]}",
        "spec.http[0].corsPolicy: this mesh does not support it yet",
    ),
    "unsupported-fault": (
        "route: [{destination: {host: r}}]\n    fault: {delay: {exponentialDelay: 1s}}",
        "spec.http[0].fault.delay.exponentialDelay: this mesh does not support it yet",
    ),
    "mirror-with-redirect": (
        "redirect: {uri: /x}\n    mirror: {host: shadow}",
        "spec.http[0].mirror: mirror and redirect cannot both be set",
    ),
    "mirror-percentage-without-mirror": (
        "route: [{destination: {host: r}}]\n    mirrorPercentage: {value: 5}",
        "spec.http[0].mirrorPercentage: applies to mirror only (it would be ignored)",
    ),
    "fault-delay-below-1ms": (
        "route: [{destination: {host: r}}]\n    fault: {delay: {fixedDelay: 0s, percentage: {value: 1}}}",
        "spec.http[0].fault.delay.fixedDelay: must be at least 1ms",
    ),
    "unsupported-match": (
        "match: [{queryParams: {a: {exact: b}}}]\n    route: [{destination: {host: r}}]",
        "spec.http[0].match[0].queryParams: this mesh does not support it yet",
    ),
    "regex": (
        "match: [{uri: {regex: '(a'}}]\n    route: [{destination: {host: r}}]",
        "spec.http[0].match[0].uri.regex: invalid regular expression '(a'",
    ),
    "re2": (
        "match: [{headers: {x: {regex: '(?!a)b'}}}]\n    route: [{destination: {host: r}}]",
        "spec.http[0].match[0].headers.x.regex: regular expression '(?!a)b' uses lookaround",
    ),
    "one-of": (
        "match: [{uri: {}}]\n    route: [{destination: {host: r}}]",
        "spec.http[0].match[0].uri: set exactly one of exact, prefix or regex (got none)",
    ),
    "no-action": ("timeout: 1s", "spec.http[0]: needs a route (destinations) or a redirect"),
    "duration": (
        "route: [{destination: {host: r}}]\n    timeout: 5 seconds",
        "spec.http[0].timeout: '5 seconds' is not a duration",
    ),
    "redirect-code": (
        "redirect: {uri: /x, redirectCode: 200}",
        "spec.http[0].redirect.redirectCode: input should be 301",
    ),
    "header-case": (
        "match: [{headers: {End-User: {exact: a}}}]\n    route: [{destination: {host: r}}]",
        "header names are matched lowercase; write 'end-user'",
    ),
    "missing": (
        "route: [{weight: 100}]",
        "spec.http[0].route[0].destination: required field is missing",
    ),
}


@pytest.mark.parametrize("http, expected", CASES.values(), ids=CASES.keys())
def test_virtual_service_refusals(http: str, expected: str) -> None:
    issues = refusal(VS.format(http=http))
    assert any(
        issue.startswith("VirtualService default/r: ") and expected in issue for issue in issues
    ), issues


def test_retries_are_enforced_and_kept_as_written() -> None:
    [resource] = validate_documents(
        VS.format(http="route: [{destination: {host: r}}]\n    retries: {attempts: 2, retryOn: '5xx,409'}")
    )
    assert resource.not_enforced == ()
    assert resource.body["spec"]["http"][0]["retries"] == {"attempts": 2, "retryOn": "5xx,409"}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a: [1\nb: 2", "document 1: malformed YAML at line 2, column 2"),
        ("a: &x [1]\nb: *x", "YAML aliases (*name) are not supported"),
        ("- 1", "expected a mapping with apiVersion, kind, metadata and spec"),
        ("kind: Gateway", "kind: Gateway is not supported yet"),
        ("kind: Frobnicator", "unknown kind 'Frobnicator'"),
        (
            "apiVersion: networking.istio.io/v2\nkind: WorkloadEntry\nmetadata: {name: w}\nspec: {address: a}",
            "WorkloadEntry default/w: apiVersion: 'networking.istio.io/v2' is not served",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: W_1}\nspec: {address: a}",
            "metadata.name: 'W_1' is not a valid name",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: w}\nspec: {address: a}\nextra: 1",
            "WorkloadEntry default/w: extra: unknown field",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: w}\nspec: {address: a, labels: {version: 1}}",
            "spec.labels.version: input should be a valid string (got 1)",
        ),
        (
            (
                "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\n"
                "spec: {host: r, subsets: [{name: v1}, {name: v1}], trafficPolicy: {loadBalancer: {simple: LEAST_CONN}}}"
            ),
            "DestinationRule default/d: spec.trafficPolicy.loadBalancer.simple: input should be 'ROUND_ROBIN'",
        ),
        (
            (
                "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\n"
                "spec: {host: r, subsets: [{name: v1}, {name: v1}]}"
            ),
            "spec.subsets[1].name: subset 'v1' is defined twice",
        ),
        (
            (
                "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: s}\n"
                "spec: {hosts: [a.com], resolution: STATIC, ports: [{number: 80, name: http}],"
                " endpoints: [{address: a.com, ports: {web: 80}}]}"
            ),
            "spec.endpoints[0].address: 'a.com' is not an IP address",
        ),
    ],
)
def test_document_refusals(text: str, expected: str) -> None:
    issues = refusal(text)
    assert any(expected in issue for issue in issues), issues


def test_every_issue_is_reported_at_once_and_duplicates_are_refused() -> None:
    bad = VS.format(http="route: [{destination: {host: r}, weight: 10}]")
    issues = refusal(bad + "---\n" + bad.replace("name: r", "name: s") + "---\n" + bad)
    assert sum("weights sum to 10" in issue for issue in issues) == 3
    good = VS.format(http="route: [{destination: {host: r}}]")
    assert any("appears twice in one apply" in issue for issue in refusal(good + "---\n" + good))


def test_subset_references_across_resources() -> None:
    service = validate_documents(VS.format(http="route: [{destination: {host: r, subset: v2}}]"))[
        0
    ].body
    rule = {"kind": "DestinationRule", "metadata": {"name": "r", "namespace": "default"},
            "spec": {"host": "r", "subsets": [{"name": "v1"}]}}  # fmt: skip
    [issue] = check_references([service, rule])
    assert str(issue) == (
        "VirtualService default/r: spec.http[0].route[0].destination.subset: subset 'v2' is not defined "
        "by any DestinationRule (DestinationRule default/r defines v1)"
    )
    # A rule in another namespace with the same short host is a different service.
    elsewhere = {
        **rule,
        "metadata": {"name": "r", "namespace": "other"},
        "spec": {"host": "r", "subsets": [{"name": "v2"}]},
    }
    assert len(check_references([service, elsewhere])) == 1
    wildcard = {
        **rule,
        "spec": {"host": "*.default.svc.cluster.local", "subsets": [{"name": "v2"}]},
    }
    assert check_references([service, wildcard]) == []


def test_helpers() -> None:
    assert resolve_kind("vs").kind == resolve_kind("VirtualServices").kind == "VirtualService"
    assert duration_seconds("1m30s") == 90 and duration_seconds("250ms") == 0.25
    assert canonical_host("reviews", "shop") == "reviews.shop.svc.cluster.local"
    assert canonical_host("api.example.com", "shop") == "api.example.com"
