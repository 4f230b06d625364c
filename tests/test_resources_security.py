"""PeerAuthentication and AuthorizationPolicy validation: Istio's files apply as written, and every
refusal names the resource, the field and the reason."""

from __future__ import annotations

import pytest

from meshctl.resources import ValidationFailed, resolve_kind, validate_documents

GOOD = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: reviews, namespace: shop}
spec:
  selector: {matchLabels: {app: reviews}}
  mtls: {mode: UNSET}
  portLevelMtls: {8080: {mode: DISABLE}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-viewer, namespace: shop}
spec:
  selector: {matchLabels: {app: reviews, version: v2}}
  action: ALLOW
  rules:
  - from:
    - source: {principals: [cluster.local/ns/shop/sa/productpage, "cluster.local/ns/ops/*"]}
    - source: {namespaces: [monitoring, "team-*"], notPrincipals: ["*/sa/legacy"]}
    to:
    - operation: {methods: [GET, "P*"], paths: [/reviews/*, "*/info", /exact], notPorts: ["9090"]}
    when:
    - {key: "request.headers[X-User]", values: ["*"], notValues: [guest]}
    - {key: source.namespace, values: [shop]}
    - {key: source.principal, notValues: [cluster.local/ns/shop/sa/robot]}
    - {key: destination.port, values: ["9080"]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-all-admin, namespace: istio-system}
spec:
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: shop}
spec: {}
"""


def test_istio_security_files_are_accepted_as_written() -> None:
    resources = validate_documents(GOOD)
    assert [str(r.ref) for r in resources] == [
        "PeerAuthentication istio-system/default", "PeerAuthentication shop/reviews",
        "AuthorizationPolicy shop/reviews-viewer", "AuthorizationPolicy istio-system/deny-all-admin",
        "AuthorizationPolicy shop/allow-nothing",
    ]  # fmt: skip
    viewer = resources[2].body["spec"]
    # camelCase and `from` come back as written; no action default is added.
    assert viewer["rules"][0]["from"][1]["source"]["notPrincipals"] == ["*/sa/legacy"]
    assert resources[4].body["spec"] == {}
    # JSON map keys are strings: the stored port-level key is "8080", and it validates again.
    assert resources[1].body["spec"]["portLevelMtls"] == {"8080": {"mode": "DISABLE"}}
    assert resolve_kind("pa").kind == "PeerAuthentication"
    assert resolve_kind("authorizationpolicies").kind == "AuthorizationPolicy"


def peer_authentication(spec: str, *, version: str = "security.istio.io/v1") -> str:
    return f"apiVersion: {version}\nkind: PeerAuthentication\nmetadata: {{name: pa, namespace: shop}}\nspec: {spec}\n"


def authorization_policy(spec: str) -> str:
    return f"apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: ap, namespace: shop}}\nspec: {spec}\n"


def rule(text: str) -> str:
    return authorization_policy(f"{{rules: [{text}]}}")


# (document, the field path it must name, words of the reason)
INVALID = {
    "mode": (peer_authentication("{mtls: {mode: STRICTER}}"), "spec.mtls.mode", "input should be 'UNSET'"),
    "group": (
        peer_authentication("{}", version="networking.istio.io/v1"),
        "apiVersion",
        "not served for PeerAuthentication; use security.istio.io/v1 (or v1beta1)",
    ),
    "port-level-without-selector": (
        peer_authentication("{portLevelMtls: {8080: {mode: STRICT}}}"),
        "spec.portLevelMtls",
        "needs a selector",
    ),
    "port-level-port": (
        peer_authentication("{selector: {matchLabels: {app: r}}, portLevelMtls: {0: {mode: STRICT}}}"),
        "spec.portLevelMtls",
        "greater than or equal to 1",
    ),
    "selector-wildcard": (
        peer_authentication("{selector: {matchLabels: {app: 'r*'}}}"),
        "spec.selector.matchLabels.app",
        "wildcards are not supported in a selector",
    ),
    "selector-shape": (
        peer_authentication("{selector: {labels: {app: r}}}"),
        "spec.selector.labels",
        "unknown field; known fields here: matchLabels",
    ),
    "audit": (authorization_policy("{action: AUDIT}"), "spec.action", "AUDIT is not supported yet"),
    "custom": (authorization_policy("{action: CUSTOM}"), "spec.action", "CUSTOM (an external authorizer) is not supported yet"),
    "action": (authorization_policy("{action: allow}"), "spec.action", "'allow' is not an action; use ALLOW or DENY"),
    "provider": (authorization_policy("{provider: {name: opa}}"), "spec.provider", "not supported yet"),
    "principal-form": (
        rule("{from: [{source: {principals: [productpage]}}]}"),
        "spec.rules[0].from[0].source.principals[0]",
        "'productpage' is not a principal: write TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT",
    ),
    "principal-spiffe": (
        rule("{from: [{source: {notPrincipals: ['spiffe://cluster.local/ns/a/sa/b']}}]}"),
        "spec.rules[0].from[0].source.notPrincipals[0]",
        "write principals without 'spiffe://'",
    ),
    "principal-wildcard": (
        rule("{from: [{source: {principals: ['cluster.local/*/sa/b']}}]}"),
        "spec.rules[0].from[0].source.principals[0]",
        "'*' is allowed only alone, at the start or at the end",
    ),
    "namespace": (
        rule("{from: [{source: {namespaces: [Shop_1]}}]}"),
        "spec.rules[0].from[0].source.namespaces[0]",
        "'Shop_1' is not a namespace",
    ),
    "request-principals": (
        rule("{from: [{source: {requestPrincipals: ['*']}}]}"),
        "spec.rules[0].from[0].source.requestPrincipals",
        "need RequestAuthentication (JWT), which is not supported yet",
    ),
    "ip-blocks": (
        rule("{from: [{source: {ipBlocks: [10.0.0.0/8]}}]}"),
        "spec.rules[0].from[0].source.ipBlocks",
        "matching by IP address is not supported yet",
    ),
    "empty-source": (rule("{from: [{source: {}}]}"), "spec.rules[0].from[0].source", "is empty; set one of principals"),
    "hosts": (
        rule("{to: [{operation: {hosts: [reviews]}}]}"),
        "spec.rules[0].to[0].operation.hosts",
        "matching by host is not supported yet",
    ),
    "path-middle-star": (
        rule("{to: [{operation: {paths: ['/api/*/admin']}}]}"),
        "spec.rules[0].to[0].operation.paths[0]",
        "'*' is allowed only alone, at the start or at the end of a path",
    ),
    "path-template": (
        rule("{to: [{operation: {notPaths: ['/api/{*}']}}]}"),
        "spec.rules[0].to[0].operation.notPaths[0]",
        "path templates",
    ),
    "path-relative": (
        rule("{to: [{operation: {paths: [admin]}}]}"),
        "spec.rules[0].to[0].operation.paths[0]",
        "a path starts with '/'",
    ),
    "path-query": (
        rule("{to: [{operation: {paths: ['/a?b=1']}}]}"),
        "spec.rules[0].to[0].operation.paths[0]",
        "without the query string",
    ),
    "method-case": (
        rule("{to: [{operation: {methods: [get]}}]}"),
        "spec.rules[0].to[0].operation.methods[0]",
        "methods are matched case-sensitively; write 'GET'",
    ),
    "port-range": (
        rule("{to: [{operation: {ports: ['70000']}}]}"),
        "spec.rules[0].to[0].operation.ports[0]",
        "'70000' is not a port number",
    ),
    "port-type": (
        rule("{to: [{operation: {ports: [8080]}}]}"),
        "spec.rules[0].to[0].operation.ports[0]",
        "input should be a valid string (got 8080)",
    ),
    "empty-operation": (rule("{to: [{operation: {}}]}"), "spec.rules[0].to[0].operation", "is empty; set one of ports"),
    "when-unknown-key": (
        rule("{when: [{key: request.header.x, values: [a]}]}"),
        "spec.rules[0].when[0].key",
        "unknown condition key 'request.header.x'; known keys: request.headers[NAME]",
    ),
    "when-ip": (
        rule("{when: [{key: remote.ip, values: [10.0.0.1]}]}"),
        "spec.rules[0].when[0].key",
        "matching by IP address is not supported yet",
    ),
    "when-header-name": (
        rule("{when: [{key: 'request.headers[]', values: [a]}]}"),
        "spec.rules[0].when[0].key",
        "'' is not a header name",
    ),
    "when-no-values": (
        rule("{when: [{key: 'request.headers[x-a]'}]}"),
        "spec.rules[0].when[0]",
        "needs values or notValues",
    ),
    "when-port-value": (
        rule("{when: [{key: destination.port, values: ['80', http]}]}"),
        "spec.rules[0].when[0].values[1]",
        "'http' is not a port number",
    ),
    "when-principal-value": (
        rule("{when: [{key: source.principal, notValues: [robot]}]}"),
        "spec.rules[0].when[0].notValues[0]",
        "'robot' is not a principal",
    ),
    "from-typo": (
        rule("{form: [{source: {principals: ['*']}}]}"),
        "spec.rules[0].form",
        "unknown field; did you mean 'from'?",
    ),
    "target-ref": (authorization_policy("{targetRef: {kind: Service, name: r}}"), "spec.targetRef", "not supported yet"),
}


@pytest.mark.parametrize("document, path, reason", INVALID.values(), ids=INVALID.keys())
def test_invalid_security_resources_name_resource_field_and_reason(document: str, path: str, reason: str) -> None:
    with pytest.raises(ValidationFailed) as caught:
        validate_documents(document)
    issues = caught.value.issues
    kind = "PeerAuthentication" if "PeerAuthentication" in document else "AuthorizationPolicy"
    assert any(
        issue.where == f"{kind} shop/{'pa' if kind == 'PeerAuthentication' else 'ap'}"
        and issue.field.startswith(path)
        and reason in issue.reason
        for issue in issues
    ), [str(issue) for issue in issues]


def test_the_security_kinds_are_no_longer_later_kinds_but_their_neighbours_are() -> None:
    with pytest.raises(ValidationFailed) as caught:
        validate_documents("kind: RequestAuthentication")
    assert "RequestAuthentication is not supported yet" in str(caught.value)
