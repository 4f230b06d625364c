"""The compiler's security output, as data: AuthorizationPolicy → RBAC filters (Istio's translation),
PeerAuthentication precedence, and auto mTLS turning on only between verified identities."""

from __future__ import annotations

import pytest

from meshctl.control import resource_types as types
from meshctl.control.compiler import INBOUND_LISTENER, compile_mesh, sidecar_resources
from meshctl.control.compiler_mtls import effective_mode
from meshctl.control.compiler_rbac import INBOUND_HARDENING
from meshctl.control.registry import Sidecar
from meshctl.resources.peer_authentication import PeerAuthenticationSpec

REVIEWS = "reviews.default.svc.cluster.local"
ALL, V1, V2 = (f"outbound|9080|{subset}|{REVIEWS}" for subset in ("", "v1", "v2"))


def spiffe(service_account: str, namespace: str = "default") -> str:
    return f"spiffe://cluster.local/ns/{namespace}/sa/{service_account}"


def reviews(version: str, app_port: int, identity: str | None = spiffe("reviews"), ready: bool = True, **extra) -> Sidecar:
    return Sidecar(
        node_id=f"reviews-{version}-{app_port}", service="reviews", version=version, service_port=9080,
        app_port=app_port, inbound_port=app_port + 1000, ready=ready, identity=identity, **extra,
    )  # fmt: skip


CLIENT = Sidecar(node_id="productpage-1", service="productpage", identity=spiffe("productpage"))
SUBSETS = {
    "apiVersion": "networking.istio.io/v1",
    "kind": "DestinationRule",
    "metadata": {"name": "reviews", "namespace": "default"},
    "spec": {"host": "reviews", "subsets": [{"name": v, "labels": {"version": v}} for v in ("v1", "v2")]},
}


def resource(kind: str, name: str, spec: dict, namespace: str = "default") -> dict:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def policy(name: str, spec: dict, namespace: str = "default") -> dict:
    return resource("AuthorizationPolicy", name, spec, namespace)


def peer(name: str, spec: dict, namespace: str = "default") -> dict:
    return resource("PeerAuthentication", name, spec, namespace)


def by_name(documents: list[dict]) -> dict[str, dict]:
    return {document["name"]: document for document in documents}


def inbound(resources: list[dict], instance: Sidecar) -> dict | None:
    compiled = sidecar_resources(compile_mesh(resources, [instance, CLIENT]), instance)
    return by_name(compiled[types.LISTENER]).get(INBOUND_LISTENER)


def managers(listener: dict) -> list[dict]:
    return [chain["filters"][0]["typed_config"] for chain in listener["filter_chains"]]


def rbac_filters(resources: list[dict], instance: Sidecar | None = None) -> list[dict]:
    instance = instance or reviews("v1", 8001)
    (manager, *others) = managers(inbound(resources, instance))
    assert all(other["http_filters"] == manager["http_filters"] for other in others)
    return [f["typed_config"]["rules"] for f in manager["http_filters"] if f["name"] == "envoy.filters.http.rbac"]


# --- AuthorizationPolicy → RBAC ---------------------------------------------------------------


def one_of(*matchers: dict) -> dict:
    return {"or_rules": {"rules": list(matchers)}}


def one_of_ids(*matchers: dict) -> dict:
    return {"or_ids": {"ids": list(matchers)}}


def path(**string_match: str) -> dict:
    return {"url_path": {"path": string_match}}


def peer_name(**string_match) -> dict:
    return {"authenticated": {"principal_name": string_match}}


def in_namespace(pattern: str) -> dict:
    return peer_name(safe_regex={"regex": f"spiffe://[^/]+/ns/{pattern}/sa/[^/]+"})


ANY = {"any": True}

# (an Istio rule, the Envoy permission it becomes, the Envoy principal); one permission and one
# principal each, the and_rules/and_ids wrappers left out. Instance: app port 8001, service port
# 9080, inbound listener 9001.
TRANSLATIONS = {
    "empty-rule-matches-all": ({}, ANY, ANY),
    "exact-path": ({"to": [{"operation": {"paths": ["/info"]}}]}, [one_of(path(exact="/info"))], ANY),
    "prefix-path": ({"to": [{"operation": {"paths": ["/api/*"]}}]}, [one_of(path(prefix="/api/"))], ANY),
    "bare-prefix-path": ({"to": [{"operation": {"paths": ["/admin*"]}}]}, [one_of(path(prefix="/admin"))], ANY),
    "suffix-path": ({"to": [{"operation": {"paths": ["*/info"]}}]}, [one_of(path(suffix="/info"))], ANY),
    "any-path": ({"to": [{"operation": {"paths": ["*"]}}]}, [one_of(ANY)], ANY),
    "not-paths": (
        {"to": [{"operation": {"notPaths": ["/a", "/b/*"]}}]},
        [{"not_rule": one_of(path(exact="/a"), path(prefix="/b/"))}],
        ANY,
    ),
    "methods": (
        {"to": [{"operation": {"methods": ["GET", "P*"], "notMethods": ["*"]}}]},
        [
            one_of({"header": {"name": ":method", "string_match": {"exact": "GET"}}},
                   {"header": {"name": ":method", "string_match": {"prefix": "P"}}}),
            {"not_rule": one_of({"header": {"name": ":method", "present_match": True}})},
        ],
        ANY,
    ),
    # The workload's service and app ports: on the wire, the inbound listener's port (mesh
    # callers) or the app port (callers redirected by --capture); another port as written.
    "ports": (
        {"to": [{"operation": {"ports": ["9080", "8001"], "notPorts": ["7000"]}}]},
        [one_of({"destination_port": 9001}, {"destination_port": 8001}),
         {"not_rule": one_of({"destination_port": 7000})}],
        ANY,
    ),
    "paths-methods-and-ports-are-anded": (
        {"to": [{"operation": {"ports": ["9080"], "methods": ["GET"], "paths": ["/a"]}}]},
        [one_of(path(exact="/a")), one_of({"header": {"name": ":method", "string_match": {"exact": "GET"}}}),
         one_of({"destination_port": 9001}, {"destination_port": 8001})],
        ANY,
    ),
    "principals": (
        {"from": [{"source": {"principals": ["cluster.local/ns/a/sa/b", "*", "cluster.local/ns/ops/*", "*/sa/robot"]}}]},
        ANY,
        [one_of_ids(
            peer_name(exact="spiffe://cluster.local/ns/a/sa/b"),
            peer_name(safe_regex={"regex": ".+"}),
            peer_name(prefix="spiffe://cluster.local/ns/ops/"),
            peer_name(suffix="/sa/robot"),
        )],
    ),
    "not-principals": (
        {"from": [{"source": {"notPrincipals": ["cluster.local/ns/a/sa/b"]}}]},
        ANY,
        [{"not_id": one_of_ids(peer_name(exact="spiffe://cluster.local/ns/a/sa/b"))}],
    ),
    "namespaces": (
        {"from": [{"source": {"namespaces": ["shop", "*", "team-*", "*-prod"], "notNamespaces": ["a"]}}]},
        ANY,
        [one_of_ids(in_namespace("shop"), in_namespace("[^/]+"), in_namespace("team-[^/]*"), in_namespace("[^/]*-prod")),
         {"not_id": one_of_ids(in_namespace("a"))}],
    ),
    "when-header": (
        {"when": [{"key": "request.headers[X-User]", "values": ["alice", "*"], "notValues": ["bob*"]}]},
        ANY,
        [one_of_ids({"header": {"name": "x-user", "string_match": {"exact": "alice"}}},
                    {"header": {"name": "x-user", "present_match": True}}),
         {"not_id": one_of_ids({"header": {"name": "x-user", "string_match": {"prefix": "bob"}}})}],
    ),
    "when-source": (
        {"when": [{"key": "source.principal", "values": ["cluster.local/ns/a/sa/b"]},
                  {"key": "source.namespace", "notValues": ["shop"]}]},
        ANY,
        [one_of_ids(peer_name(exact="spiffe://cluster.local/ns/a/sa/b")),
         {"not_id": one_of_ids(in_namespace("shop"))}],
    ),
    "when-destination-port": (
        {"when": [{"key": "destination.port", "values": ["9080"]}]},
        [one_of({"destination_port": 9001}, {"destination_port": 8001})],
        ANY,
    ),
}


def unwrap(found: dict, key: str, items: str) -> object:
    return found if found == ANY else found[key][items]


@pytest.mark.parametrize("rule, permission, principal", TRANSLATIONS.values(), ids=TRANSLATIONS.keys())
def test_each_rule_form_is_translated_as_istio_does(rule, permission, principal):
    [allow] = rbac_filters([policy("p", {"rules": [rule]})])
    assert allow["action"] == "ALLOW"
    translated = allow["policies"]["ns[default]-policy[p]-rule[0]"]
    [found_permission] = translated["permissions"]
    [found_principal] = translated["principals"]
    assert unwrap(found_permission, "and_rules", "rules") == permission
    assert unwrap(found_principal, "and_ids", "ids") == principal


def test_sources_and_operations_are_ored_and_when_conditions_apply_to_each():
    rule = {
        "from": [{"source": {"principals": ["cluster.local/ns/a/sa/b"]}}, {"source": {"namespaces": ["ops"]}}],
        "to": [{"operation": {"paths": ["/a"]}}, {"operation": {"methods": ["POST"]}}],
        "when": [{"key": "request.headers[x-a]", "values": ["1"]}, {"key": "destination.port", "values": ["9080"]}],
    }
    [allow] = rbac_filters([policy("p", {"rules": [rule]})])
    translated = allow["policies"]["ns[default]-policy[p]-rule[0]"]
    header = one_of_ids({"header": {"name": "x-a", "string_match": {"exact": "1"}}})
    port = one_of({"destination_port": 9001}, {"destination_port": 8001})
    assert translated["permissions"] == [
        {"and_rules": {"rules": [one_of(path(exact="/a")), port]}},
        {"and_rules": {"rules": [one_of({"header": {"name": ":method", "string_match": {"exact": "POST"}}}), port]}},
    ]
    assert translated["principals"] == [
        {"and_ids": {"ids": [one_of_ids(peer_name(exact="spiffe://cluster.local/ns/a/sa/b")), header]}},
        {"and_ids": {"ids": [one_of_ids(in_namespace("ops")), header]}},
    ]


def test_deny_comes_first_and_each_rule_is_a_named_policy():
    resources = [
        policy("viewers", {"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}, {}]}),
        policy("no-admin", {"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}]}),
        policy("mesh-deny", {"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["evil"]}}]}]},
               namespace="istio-system"),
    ]
    deny, allow = rbac_filters(resources)
    assert deny["action"] == "DENY" and allow["action"] == "ALLOW"
    assert set(deny["policies"]) == {"ns[default]-policy[no-admin]-rule[0]", "ns[istio-system]-policy[mesh-deny]-rule[0]"}
    assert set(allow["policies"]) == {"ns[default]-policy[viewers]-rule[0]", "ns[default]-policy[viewers]-rule[1]"}
    # The RBAC filters sit before the router, which stays last.
    (manager, _) = managers(inbound(resources, reviews("v1", 8001)))
    assert [f["name"] for f in manager["http_filters"]] == [
        "envoy.filters.http.rbac", "envoy.filters.http.rbac", "envoy.filters.http.router",
    ]  # fmt: skip


def test_an_allow_policy_without_rules_denies_everything_and_deny_without_rules_nothing():
    assert rbac_filters([policy("nothing", {})]) == [{"action": "ALLOW", "policies": {}}]
    assert rbac_filters([policy("nothing", {"action": "DENY"})]) == [{"action": "DENY", "policies": {}}]
    # With another ALLOW policy, allow-nothing adds nothing: the other's rules decide.
    both = rbac_filters([policy("nothing", {}), policy("all", {"rules": [{}]})])
    assert both == [{"action": "ALLOW", "policies": {"ns[default]-policy[all]-rule[0]": {"permissions": [ANY], "principals": [ANY]}}}]


def test_which_policies_select_a_workload():
    v1, v2 = reviews("v1", 8001), reviews("v2", 8002, labels={"track": "canary"})
    resources = [
        policy("v2-only", {"selector": {"matchLabels": {"app": "reviews", "version": "v2"}}, "rules": [{}]}),
        policy("canary", {"selector": {"matchLabels": {"track": "canary"}}, "rules": [{}]}),
        policy("elsewhere", {"rules": [{}]}, namespace="shop"),
        # The root namespace's selector reaches workloads in every namespace (Istio).
        policy("root-selected", {"selector": {"matchLabels": {"app": "reviews"}}, "rules": [{}]}, namespace="istio-system"),
    ]
    def names(instance: Sidecar) -> set[str]:
        return set(rbac_filters(resources, instance)[0]["policies"])

    assert names(v1) == {"ns[istio-system]-policy[root-selected]-rule[0]"}
    assert names(v2) == {
        "ns[default]-policy[v2-only]-rule[0]", "ns[default]-policy[canary]-rule[0]",
        "ns[istio-system]-policy[root-selected]-rule[0]",
    }  # fmt: skip


def test_the_inbound_manager_is_hardened_with_an_identity_or_a_policy_and_untouched_otherwise():
    plain = reviews("v1", 8001, identity=None)
    (manager,) = managers(inbound([], plain))
    assert not set(INBOUND_HARDENING) & set(manager)
    assert [f["name"] for f in manager["http_filters"]] == ["envoy.filters.http.router"]
    for instance, resources in ((plain, [policy("p", {"rules": [{}]})]), (reviews("v1", 8001), [])):
        for manager in managers(inbound(resources, instance)):
            assert {key: manager[key] for key in INBOUND_HARDENING} == {
                "normalize_path": True,
                "merge_slashes": True,
                "path_with_escaped_slashes_action": "REJECT_REQUEST",
                "forward_client_cert_details": "SANITIZE_SET",
                "set_current_client_cert_details": {"uri": True},
            }


# --- PeerAuthentication -------------------------------------------------------------------------


class Stored:
    def __init__(self, namespace: str, spec: dict) -> None:
        self.namespace = namespace
        self.spec = PeerAuthenticationSpec.model_validate(spec)


LABELS = {"app": "reviews", "version": "v1"}
MESH_STRICT = Stored("istio-system", {"mtls": {"mode": "STRICT"}})
NS_PERMISSIVE = Stored("default", {"mtls": {"mode": "PERMISSIVE"}})
NS_UNSET = Stored("default", {"mtls": {"mode": "UNSET"}})
WORKLOAD_DISABLE = Stored("default", {"selector": {"matchLabels": {"app": "reviews"}}, "mtls": {"mode": "DISABLE"}})
WORKLOAD_UNSET_PORT = Stored(
    "default", {"selector": {"matchLabels": {"version": "v1"}}, "portLevelMtls": {"8001": {"mode": "STRICT"}}}
)


@pytest.mark.parametrize(
    "policies, port, mode",
    [
        ([], 8001, "PERMISSIVE"),  # nothing set: Istio's default
        ([MESH_STRICT], 8001, "STRICT"),
        ([MESH_STRICT, NS_PERMISSIVE], 8001, "PERMISSIVE"),  # namespace over mesh
        ([MESH_STRICT, NS_UNSET], 8001, "STRICT"),  # UNSET inherits
        ([MESH_STRICT, NS_PERMISSIVE, WORKLOAD_DISABLE], 8001, "DISABLE"),  # workload over namespace
        ([MESH_STRICT, WORKLOAD_UNSET_PORT], 8001, "STRICT"),  # port level for the app port
        ([NS_PERMISSIVE, WORKLOAD_UNSET_PORT], 8001, "STRICT"),
        ([NS_PERMISSIVE, WORKLOAD_UNSET_PORT], 8002, "PERMISSIVE"),  # another port: the workload's UNSET inherits
        ([WORKLOAD_DISABLE, WORKLOAD_UNSET_PORT], 8001, "DISABLE"),  # two workload policies: the oldest wins
        ([Stored("default", {"mtls": {"mode": "STRICT"}}), NS_PERMISSIVE], 8001, "STRICT"),  # oldest namespace-wide
        ([Stored("shop", {"mtls": {"mode": "STRICT"}})], 8001, "PERMISSIVE"),  # another namespace
        # A selector in the root namespace is not a workload policy (Istio ignores it).
        ([Stored("istio-system", {"selector": {"matchLabels": {"app": "reviews"}}, "mtls": {"mode": "STRICT"}})], 8001, "PERMISSIVE"),
    ],
)
def test_peer_authentication_precedence(policies, port, mode):
    assert effective_mode(policies, "default", LABELS, port) == mode


def chains(listener: dict) -> list[str]:
    return [
        chain.get("filter_chain_match", {}).get("transport_protocol", "any")
        + ("+tls" if "transport_socket" in chain else "")
        for chain in listener["filter_chains"]
    ]


def test_inbound_chains_follow_the_mode_and_the_identity():
    instance = reviews("v1", 8001)
    permissive = inbound([], instance)
    assert chains(permissive) == ["tls+tls", "raw_buffer"]
    assert permissive["listener_filters"][0]["name"] == "envoy.filters.listener.tls_inspector"
    tls = permissive["filter_chains"][0]["transport_socket"]["typed_config"]
    assert tls["require_client_certificate"] is True
    assert tls["common_tls_context"]["alpn_protocols"] == ["h2", "http/1.1"]
    assert tls["common_tls_context"]["combined_validation_context"]["default_validation_context"] == {
        "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"prefix": "spiffe://cluster.local/"}}]
    }
    assert chains(inbound([peer("strict", {"mtls": {"mode": "STRICT"}}, "istio-system")], instance)) == ["tls+tls"]
    disabled = inbound([peer("off", {"mtls": {"mode": "DISABLE"}})], instance)
    assert chains(disabled) == ["any"] and "listener_filters" not in disabled
    # Without an identity: plaintext as before; STRICT leaves no way in (no inbound listener).
    plain = reviews("v1", 8001, identity=None)
    assert chains(inbound([], plain)) == ["any"]
    assert inbound([peer("strict", {"mtls": {"mode": "STRICT"}})], plain) is None


# --- auto mTLS on clusters ----------------------------------------------------------------------


def clusters(registry: list[Sidecar], resources=(SUBSETS,)) -> dict[str, dict]:
    return by_name(sidecar_resources(compile_mesh(list(resources), registry), CLIENT)[types.CLUSTER])


def upstream(cluster: dict) -> dict | None:
    socket = cluster.get("transport_socket")
    return socket["typed_config"] if socket else None


def expected_sans(cluster: dict) -> list[str]:
    context = upstream(cluster)["common_tls_context"]["combined_validation_context"]
    return [m["matcher"]["exact"] for m in context["default_validation_context"]["match_typed_subject_alt_names"]]


def http2(cluster: dict) -> bool:
    options = cluster.get("typed_extension_protocol_options", {}).values()
    return any("http2_protocol_options" in o["explicit_http_config"] for o in options)


def test_clusters_whose_instances_all_have_identities_use_mtls_over_h2():
    registry = [reviews("v1", 8001, spiffe("reviews-v1")), reviews("v2", 8002), reviews("v2", 8003), CLIENT]
    found = clusters(registry)
    for name in (ALL, V1, V2):
        assert http2(found[name])
        tls = upstream(found[name])
        assert tls["common_tls_context"]["alpn_protocols"] == ["h2"]
        assert tls["common_tls_context"]["tls_certificate_sds_secret_configs"] == [
            {"name": "default", "sds_config": {"ads": {}, "resource_api_version": "V3"}}
        ]
        validation = tls["common_tls_context"]["combined_validation_context"]
        assert validation["validation_context_sds_secret_config"]["name"] == "ROOTCA"
    assert upstream(found[ALL])["sni"] == f"outbound_.9080_._.{REVIEWS}"
    assert upstream(found[V1])["sni"] == f"outbound_.9080_.v1_.{REVIEWS}"
    assert expected_sans(found[ALL]) == [spiffe("reviews"), spiffe("reviews-v1")]
    assert expected_sans(found[V1]) == [spiffe("reviews-v1")]
    assert expected_sans(found[V2]) == [spiffe("reviews")]


def test_one_instance_without_identity_or_with_mtls_disabled_keeps_its_clusters_plaintext():
    registry = [reviews("v1", 8001), reviews("v2", 8002, identity=None), CLIENT]
    found = clusters(registry)
    assert upstream(found[V1]) is not None
    assert upstream(found[ALL]) is None and upstream(found[V2]) is None
    assert not http2(found[ALL])  # the app speaks HTTP/1.1 and so does its plaintext cluster
    disable_v2 = peer("v2-off", {"selector": {"matchLabels": {"version": "v2"}}, "mtls": {"mode": "DISABLE"}})
    found = clusters([reviews("v1", 8001), reviews("v2", 8002), CLIENT], (SUBSETS, disable_v2))
    assert upstream(found[V1]) is not None
    assert upstream(found[ALL]) is None and upstream(found[V2]) is None


def test_without_identities_clusters_are_exactly_as_before():
    registry = [reviews("v1", 8001, identity=None), reviews("v2", 8002, identity=None), CLIENT]
    for cluster in clusters(registry).values():
        assert "transport_socket" not in cluster and "typed_extension_protocol_options" not in cluster
    # No ready instance: nothing to verify, so no TLS either.
    assert upstream(clusters([reviews("v1", 8001, ready=False), CLIENT])[ALL]) is None


def test_a_caller_without_an_identity_reaches_the_same_instances_in_plaintext():
    registry = [reviews("v1", 8001), reviews("v2", 8002), CLIENT]
    mesh = compile_mesh([SUBSETS], registry)
    anonymous = Sidecar(node_id="curl-1", service="curl")  # registered with the API token: no certificate
    plain = by_name(sidecar_resources(mesh, anonymous)[types.CLUSTER])
    secure = by_name(sidecar_resources(mesh, CLIENT)[types.CLUSTER])
    assert set(plain) == set(secure) == {ALL, V1, V2}
    for name in plain:
        assert upstream(plain[name]) is None and not http2(plain[name])
        assert upstream(secure[name]) is not None and http2(secure[name])


def test_the_publisher_gives_callers_with_and_without_an_identity_their_own_shared_clusters():
    from meshctl.control.snapshot import SnapshotCache
    from meshctl.control.xds_service import Publisher

    callers = [Sidecar(node_id=f"secure-{i}", service="productpage", identity=spiffe("productpage")) for i in range(3)]
    callers += [Sidecar(node_id=f"plain-{i}", service="curl") for i in range(3)]
    cache = SnapshotCache()
    Publisher(cache).publish(1, [SUBSETS], 0, [reviews("v1", 8001), reviews("v2", 8002), *callers])
    cds = {caller.node_id: cache.snapshot_for(caller.node_id).of_type(types.CLUSTER) for caller in callers}
    # Packed once per variant and shared inside it.
    assert len({id(cds[f"secure-{i}"]) for i in range(3)}) == len({id(cds[f"plain-{i}"]) for i in range(3)}) == 1
    secure, plain = cds["secure-0"].items[V1], cds["plain-0"].items[V1]
    assert b"UpstreamTlsContext" in secure.value and b"UpstreamTlsContext" not in plain.value


async def test_policies_applied_through_the_store_compile_as_written(tmp_path):
    """YAML → validation → store → compile: stored bodies (`from`, string map keys) parse again,
    and the store's creation order decides which of two namespace-wide policies is oldest."""
    from meshctl.control.store import Put
    from meshctl.control.store_sqlite import SqliteStore
    from meshctl.resources import validate_documents

    text = """
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: a-older}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: reviews}
spec: {selector: {matchLabels: {app: reviews}}, portLevelMtls: {8001: {mode: PERMISSIVE}}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: viewers}
spec: {rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/productpage]}}]}]}
"""
    store = SqliteStore.open(tmp_path / "store.db")
    try:
        for resource in validate_documents(text):  # one write each: creation order is apply order
            await store.write([Put(resource.ref, resource.body)])
        await store.write([Put(*_newer_namespace_policy())])
        _, stored = await store.snapshot()
    finally:
        await store.aclose()
    instance = reviews("v1", 8001)
    listener = by_name(sidecar_resources(compile_mesh(stored, [instance, CLIENT]), instance)[types.LISTENER])
    # The port-level PERMISSIVE for the app port (key "8001" once stored) beats namespace STRICT.
    assert chains(listener[INBOUND_LISTENER]) == ["tls+tls", "raw_buffer"]
    [allow] = [f["typed_config"]["rules"] for f in managers(listener[INBOUND_LISTENER])[0]["http_filters"]
               if f["name"] == "envoy.filters.http.rbac"]
    assert list(allow["policies"]) == ["ns[default]-policy[viewers]-rule[0]"]
    other = reviews("v1", 8002)  # not the port-level port: the oldest namespace policy, STRICT
    listener = by_name(sidecar_resources(compile_mesh(stored, [other, CLIENT]), other)[types.LISTENER])
    assert chains(listener[INBOUND_LISTENER]) == ["tls+tls"]


def _newer_namespace_policy():
    from meshctl.resources import ResourceRef

    ref = ResourceRef("PeerAuthentication", "default", "0-newer")
    return ref, peer("0-newer", {"mtls": {"mode": "DISABLE"}})
