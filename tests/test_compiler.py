"""The xDS compiler: resources + registry → clusters, endpoints, listeners and routes per sidecar.
No network: the output is checked as data, and fed to an engine (which validates without serving
traffic) to prove every sidecar would accept it."""

from __future__ import annotations

import pytest

from meshctl.control import resource_types as types
from meshctl.control.compiler import (
    INBOUND_LISTENER,
    OUTBOUND_LISTENER,
    OUTBOUND_ROUTES,
    compile_mesh,
    host_aliases,
    sidecar_resources,
    to_messages,
)
from meshctl.control.compiler_resilience import retry_policy
from meshctl.control.registry import Sidecar

REVIEWS = "reviews.default.svc.cluster.local"
V1 = f"outbound|9080|v1|{REVIEWS}"
V2 = f"outbound|9080|v2|{REVIEWS}"
ALL = f"outbound|9080||{REVIEWS}"
# Istio's default retry policy: every route gets it unless its VirtualService says otherwise.
ISTIO_RETRIES = retry_policy(None)


def reviews(version: str, port: int, *, ready: bool = True, **extra) -> Sidecar:
    return Sidecar(
        node_id=f"reviews-{version}-{port}", service="reviews", version=version, service_port=9080,
        app_port=port, inbound_port=port + 1000, ready=ready, **extra,
    )  # fmt: skip


CLIENT = Sidecar(node_id="productpage-1", service="productpage", outbound_port=16001)
REGISTRY = [reviews("v1", 8001), reviews("v2", 8002), reviews("v2", 8003), CLIENT]


def destination_rule(host: str = "reviews", subsets=("v1", "v2"), **spec) -> dict:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": host.split(".")[0], "namespace": "default"},
        "spec": {"host": host, "subsets": [{"name": s, "labels": {"version": s}} for s in subsets], **spec},
    }


def virtual_service(http: list[dict], hosts=("reviews",), name="reviews", namespace="default") -> dict:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"hosts": list(hosts), "http": http},
    }


def split(v1: int, v2: int) -> dict:
    return {
        "route": [
            {"destination": {"host": "reviews", "subset": "v1"}, "weight": v1},
            {"destination": {"host": "reviews", "subset": "v2"}, "weight": v2},
        ]
    }


def by_name(documents: list[dict], key: str = "name") -> dict[str, dict]:
    return {document[key]: document for document in documents}


def outbound_routes(resources) -> dict[str, dict]:
    (table,) = resources[types.ROUTE]
    assert table["name"] == OUTBOUND_ROUTES
    return by_name(table["virtual_hosts"])


def endpoint_ports(resources, cluster: str) -> list[int]:
    assignment = by_name(resources[types.ENDPOINT], "cluster_name")[cluster]
    return [
        lb["endpoint"]["address"]["socket_address"]["port_value"]
        for group in assignment.get("endpoints", [])
        for lb in group["lb_endpoints"]
    ]


def test_without_resources_every_service_gets_one_cluster_and_a_catch_all_route():
    resources = sidecar_resources(compile_mesh([], REGISTRY), CLIENT)
    clusters = by_name(resources[types.CLUSTER])
    assert set(clusters) == {ALL}  # the client has no app port: no inbound cluster, no service
    assert clusters[ALL]["type"] == "EDS"
    assert clusters[ALL]["eds_cluster_config"]["eds_config"] == {"ads": {}, "resource_api_version": "V3"}
    # Endpoints are the instances' inbound listeners, sorted.
    assert endpoint_ports(resources, ALL) == [9001, 9002, 9003]
    hosts = outbound_routes(resources)
    assert set(hosts) == {f"{REVIEWS}:9080"}
    vhost = hosts[f"{REVIEWS}:9080"]
    assert vhost["routes"] == [{"match": {"prefix": "/"}, "route": {"cluster": ALL, "timeout": "0s", "retry_policy": ISTIO_RETRIES}}]
    # Every way a caller in the same namespace may name it, with the port; bare names mean port 80,
    # which reviews lacks, so they go to its lowest port.
    for domain in ("reviews", "reviews:9080", "reviews.default", "reviews.default:9080",
                   "reviews.default.svc:9080", REVIEWS, f"{REVIEWS}:9080"):  # fmt: skip
        assert domain in vhost["domains"]
    (listener,) = resources[types.LISTENER]
    assert listener["name"] == OUTBOUND_LISTENER
    assert listener["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 16001}
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    assert manager["rds"]["route_config_name"] == OUTBOUND_ROUTES


def test_subsets_become_clusters_with_the_instances_their_labels_select():
    mesh = compile_mesh([destination_rule()], REGISTRY)
    resources = sidecar_resources(mesh, CLIENT)
    assert set(by_name(resources[types.CLUSTER])) == {ALL, V1, V2}
    assert endpoint_ports(resources, V1) == [9001]
    assert endpoint_ports(resources, V2) == [9002, 9003]
    assert endpoint_ports(resources, ALL) == [9001, 9002, 9003]


def test_instances_that_are_not_ready_or_have_no_app_are_not_endpoints():
    registry = [reviews("v1", 8001, ready=False), reviews("v2", 8002), CLIENT]
    resources = sidecar_resources(compile_mesh([destination_rule()], registry), CLIENT)
    assert endpoint_ports(resources, V1) == []
    assert "endpoints" not in by_name(resources[types.ENDPOINT], "cluster_name")[V1]
    assert endpoint_ports(resources, V2) == [9002]


def test_extra_labels_narrow_a_subset():
    rule = destination_rule(subsets=())
    rule["spec"]["subsets"] = [{"name": "canary", "labels": {"version": "v2", "track": "canary"}}]
    registry = [reviews("v2", 8002, labels={"track": "canary"}), reviews("v2", 8003), CLIENT]
    resources = sidecar_resources(compile_mesh([rule], registry), CLIENT)
    assert endpoint_ports(resources, f"outbound|9080|canary|{REVIEWS}") == [9002]


def test_weighted_virtual_service_splits_by_subset():
    mesh = compile_mesh([destination_rule(), virtual_service([split(90, 10)])], REGISTRY)
    vhost = outbound_routes(sidecar_resources(mesh, CLIENT))[f"{REVIEWS}:9080"]
    assert vhost["routes"] == [
        {
            "match": {"prefix": "/"},
            "route": {
                "weighted_clusters": {"clusters": [{"name": V1, "weight": 90}, {"name": V2, "weight": 10}]},
                "timeout": "0s",
                "retry_policy": ISTIO_RETRIES,
            },
        }
    ]


def test_a_single_destination_is_a_plain_cluster_and_zero_weights_stay():
    http = [
        {"route": [{"destination": {"host": "reviews", "subset": "v2"}}]},
    ]
    mesh = compile_mesh([destination_rule(), virtual_service(http)], REGISTRY)
    assert outbound_routes(sidecar_resources(mesh, CLIENT))[f"{REVIEWS}:9080"]["routes"][0]["route"] == {"cluster": V2, "timeout": "0s", "retry_policy": ISTIO_RETRIES}
    mesh = compile_mesh([destination_rule(), virtual_service([split(100, 0)])], REGISTRY)
    route = outbound_routes(sidecar_resources(mesh, CLIENT))[f"{REVIEWS}:9080"]["routes"][0]["route"]
    assert route["weighted_clusters"]["clusters"] == [{"name": V1, "weight": 100}, {"name": V2, "weight": 0}]


def test_header_uri_and_method_matches_in_order_with_one_route_per_match():
    http = [
        {
            "name": "jason",
            "match": [{"headers": {"end-user": {"exact": "jason"}}}, {"uri": {"prefix": "/beta"}, "method": {"exact": "POST"}}],
            "route": [{"destination": {"host": "reviews", "subset": "v2"}}],
            "timeout": "1m30s",
            "rewrite": {"uri": "/", "authority": "reviews-beta"},
            "headers": {"request": {"set": {"x-a": "1"}, "add": {"x-b": "2"}, "remove": ["x-c"]}, "response": {"remove": ["server"]}},
        },
        {"match": [{"uri": {"exact": "/health"}}, {"uri": {"regex": "/v[0-9]+/.*"}}], "redirect": {"uri": "/ok", "redirectCode": 308}},
        split(100, 0),
    ]
    mesh = compile_mesh([destination_rule(), virtual_service(http)], REGISTRY)
    routes = outbound_routes(sidecar_resources(mesh, CLIENT))[f"{REVIEWS}:9080"]["routes"]
    assert [route["match"] for route in routes] == [
        {"prefix": "/", "headers": [{"name": "end-user", "string_match": {"exact": "jason"}}]},
        {"prefix": "/beta", "headers": [{"name": ":method", "string_match": {"exact": "POST"}}]},
        {"path": "/health"},
        {"safe_regex": {"regex": "/v[0-9]+/.*"}},
        {"prefix": "/"},
    ]
    assert routes[0]["name"] == routes[1]["name"] == "jason"
    assert routes[0]["route"] == {
        "cluster": V2, "timeout": "90.000s", "prefix_rewrite": "/", "host_rewrite_literal": "reviews-beta",
        "retry_policy": ISTIO_RETRIES,
    }  # fmt: skip
    assert routes[0]["request_headers_to_add"] == [
        {"header": {"key": "x-a", "value": "1"}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"},
        {"header": {"key": "x-b", "value": "2"}, "append_action": "APPEND_IF_EXISTS_OR_ADD"},
    ]
    assert routes[0]["request_headers_to_remove"] == ["x-c"]
    assert routes[0]["response_headers_to_remove"] == ["server"]
    assert routes[2]["redirect"] == {"path_redirect": "/ok", "response_code": "PERMANENT_REDIRECT"}


def test_short_names_mean_the_callers_namespace():
    other = Sidecar(node_id="other-1", service="web", namespace="shop")
    mesh = compile_mesh([], [*REGISTRY, other])
    here = outbound_routes(sidecar_resources(mesh, CLIENT))[f"{REVIEWS}:9080"]["domains"]
    there = outbound_routes(sidecar_resources(mesh, other))[f"{REVIEWS}:9080"]["domains"]
    assert "reviews" in here and "reviews:9080" in here
    assert "reviews" not in there and "reviews:9080" not in there
    assert "reviews.default:9080" in there
    assert host_aliases("api.example.com", "default") == ["api.example.com"]


def test_virtual_service_for_a_host_with_no_instances_and_other_namespaces():
    # A VS in namespace "shop" for "ratings" (ratings.shop...) routing to a port; nothing registered.
    http = [{"route": [{"destination": {"host": "ratings", "port": {"number": 9090}}}]}]
    mesh = compile_mesh([virtual_service(http, hosts=("ratings",), name="ratings", namespace="shop")], REGISTRY)
    resources = sidecar_resources(mesh, CLIENT)
    ratings = "ratings.shop.svc.cluster.local"
    assert outbound_routes(resources)[f"{ratings}:80"]["routes"][0]["route"] == {"cluster": f"outbound|9090||{ratings}", "timeout": "0s", "retry_policy": ISTIO_RETRIES}
    clusters = by_name(resources[types.CLUSTER])
    assert f"outbound|9090||{ratings}" in clusters and f"outbound|80||{ratings}" in clusters
    assert endpoint_ports(resources, f"outbound|9090||{ratings}") == []


def test_oldest_virtual_service_wins_a_host_and_load_balancer_policy_applies():
    rule = destination_rule(trafficPolicy={"loadBalancer": {"simple": "LEAST_REQUEST"}})
    rule["spec"]["subsets"][1]["trafficPolicy"] = {"loadBalancer": {"simple": "RANDOM"}}
    first = virtual_service([split(100, 0)], name="a")
    second = virtual_service([split(0, 100)], name="b")
    mesh = compile_mesh([rule, first, second], REGISTRY)
    resources = sidecar_resources(mesh, CLIENT)
    route = outbound_routes(resources)[f"{REVIEWS}:9080"]["routes"][0]["route"]
    assert route["weighted_clusters"]["clusters"][0] == {"name": V1, "weight": 100}
    clusters = by_name(resources[types.CLUSTER])
    assert clusters[V1]["lb_policy"] == "LEAST_REQUEST"
    assert clusters[V2]["lb_policy"] == "RANDOM"
    # A subset policy without a load balancer keeps the host's.
    rule["spec"]["subsets"][1]["trafficPolicy"] = {"connectionPool": {"tcp": {"maxConnections": 10}}}
    clusters = by_name(sidecar_resources(compile_mesh([rule], REGISTRY), CLIENT)[types.CLUSTER])
    assert clusters[V2]["lb_policy"] == "LEAST_REQUEST"
    assert "lb_policy" not in compile_mesh([], REGISTRY).clusters[0]


def test_a_sidecar_with_an_app_gets_an_inbound_listener_to_its_app():
    instance = reviews("v1", 8001, address="127.0.0.1")
    resources = sidecar_resources(compile_mesh([], REGISTRY), instance)
    listeners = by_name(resources[types.LISTENER])
    assert set(listeners) == {OUTBOUND_LISTENER, INBOUND_LISTENER}
    assert listeners[INBOUND_LISTENER]["address"]["socket_address"]["port_value"] == 9001
    local = by_name(resources[types.CLUSTER])["inbound|8001||"]
    assert local["type"] == "STATIC"
    assert local["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"] == {
        "address": "127.0.0.1", "port_value": 8001,
    }  # fmt: skip
    routes = listeners[INBOUND_LISTENER]["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]
    assert routes["virtual_hosts"][0]["routes"][0]["route"] == {"cluster": "inbound|8001||", "timeout": "0s"}


def test_compiling_is_deterministic():
    resources = [destination_rule(), virtual_service([split(50, 50)])]
    first = sidecar_resources(compile_mesh(resources, REGISTRY), CLIENT)
    second = sidecar_resources(compile_mesh(resources, list(reversed(REGISTRY))), CLIENT)
    assert first == second


def service_entry(name: str, **spec) -> dict:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    }


def workload_entry(name: str, **spec) -> dict:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "WorkloadEntry",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    }


STATIC_ENTRY = service_entry(
    "payments",
    hosts=["payments.example.com"],
    ports=[{"number": 8443, "name": "http", "protocol": "HTTP", "targetPort": 9443}],
    resolution="STATIC",
    endpoints=[
        {"address": "10.0.0.1", "labels": {"version": "v1"}},
        {"address": "10.0.0.2", "ports": {"http": 7000}, "labels": {"version": "v2"}, "weight": 3},
    ],
    workloadSelector={"labels": {"app": "payments"}},
)
PAYMENTS = "outbound|8443||payments.example.com"


def test_a_static_service_entry_reaches_its_endpoints_and_selected_workload_entries():
    resources = [
        STATIC_ENTRY,
        workload_entry("vm-1", address="10.0.0.9", labels={"app": "payments", "version": "v2"}),
        workload_entry("vm-2", address="10.0.0.8", labels={"app": "other"}),
        destination_rule("payments.example.com"),
    ]
    compiled = sidecar_resources(compile_mesh(resources, REGISTRY), CLIENT)
    assert by_name(compiled[types.CLUSTER])[PAYMENTS]["type"] == "EDS"
    (assignment,) = [a for a in compiled[types.ENDPOINT] if a["cluster_name"] == PAYMENTS]
    endpoints = [
        (e["endpoint"]["address"]["socket_address"]["address"], e["endpoint"]["address"]["socket_address"]["port_value"], e.get("load_balancing_weight"))
        for e in assignment["endpoints"][0]["lb_endpoints"]
    ]
    # targetPort by default, the endpoint's own named port when it has one; weights kept.
    assert endpoints == [("10.0.0.1", 9443, None), ("10.0.0.2", 7000, 3), ("10.0.0.9", 9443, None)]
    assert endpoint_ports(compiled, "outbound|8443|v2|payments.example.com") == [7000, 9443]
    vhost = outbound_routes(compiled)["payments.example.com:8443"]
    assert vhost["domains"] == ["payments.example.com", "payments.example.com:8443"]
    assert vhost["routes"][0]["route"] == {"cluster": PAYMENTS, "timeout": "0s", "retry_policy": ISTIO_RETRIES}


def test_dns_service_entries_resolve_their_endpoints_or_the_host():
    entries = [
        service_entry("api", hosts=["api.example.com"], ports=[{"number": 80, "name": "http"}], resolution="DNS"),
        service_entry(
            "mirrors", hosts=["mirrors.example.com"], ports=[{"number": 8080, "name": "http"}],
            resolution="DNS_ROUND_ROBIN", endpoints=[{"address": "a.example.net"}, {"address": "b.example.net"}],
        ),
        service_entry("passthrough", hosts=["legacy.example.com"], ports=[{"number": 80, "name": "http"}]),
    ]  # fmt: skip
    compiled = sidecar_resources(compile_mesh(entries, REGISTRY), CLIENT)
    clusters = by_name(compiled[types.CLUSTER])
    api = clusters["outbound|80||api.example.com"]
    assert api["type"] == "STRICT_DNS"
    address = api["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert address == {"address": "api.example.com", "port_value": 80}
    mirrors = clusters["outbound|8080||mirrors.example.com"]
    assert mirrors["type"] == "LOGICAL_DNS"
    assert len(mirrors["load_assignment"]["endpoints"][0]["lb_endpoints"]) == 1
    assert not any("legacy" in name for name in clusters)  # resolution NONE: not compiled yet
    assert "outbound|80||api.example.com" not in {a["cluster_name"] for a in compiled[types.ENDPOINT]}


def test_grpc_services_and_apps_are_reached_over_http2():
    grpc_instance = Sidecar(
        node_id="g1", service="greeter", service_port=50051, app_port=7001, inbound_port=7002,
        ready=True, protocol="GRPC",
    )  # fmt: skip
    entry = service_entry("h2", hosts=["h2.example.com"], ports=[{"number": 443, "protocol": "HTTP2"}],
                          resolution="STATIC", endpoints=[{"address": "10.0.0.5"}])  # fmt: skip
    compiled = sidecar_resources(compile_mesh([entry], [*REGISTRY, grpc_instance]), grpc_instance)
    clusters = by_name(compiled[types.CLUSTER])

    def http2(name: str) -> bool:
        options = clusters[name].get("typed_extension_protocol_options", {})
        return any("http2_protocol_options" in o["explicit_http_config"] for o in options.values())

    assert http2("outbound|50051||greeter.default.svc.cluster.local")
    assert http2("outbound|443||h2.example.com")
    assert http2("inbound|7001||")
    assert not http2(ALL)


@pytest.fixture(scope="module")
def engine():
    from meshctl import _core
    from meshctl.agent.bootstrap import bootstrap_from_dict

    running = _core.Engine(bootstrap_from_dict({}), worker_threads=1)
    yield running
    running.stop()


@pytest.mark.parametrize(
    "resources",
    [
        [],
        [destination_rule()],
        [destination_rule(), virtual_service([split(90, 10)])],
        [
            destination_rule(trafficPolicy={"loadBalancer": {"simple": "RANDOM"}}),
            virtual_service(
                [
                    {
                        "match": [{"headers": {"end-user": {"regex": "ja.*"}}, "method": {"prefix": "G"}}],
                        "route": [{"destination": {"host": "reviews", "subset": "v2"}}],
                        "timeout": "2s",
                        "rewrite": {"uri": "/v2/", "authority": "reviews.internal"},
                        "headers": {"request": {"set": {"x-a": "1"}, "remove": ["x-b"]}},
                    },
                    {"match": [{"uri": {"exact": "/old"}}], "redirect": {"uri": "/new", "authority": "example.com", "redirectCode": 301}},
                    split(100, 0),
                ]
            ),
        ],
        [
            STATIC_ENTRY,
            destination_rule("payments.example.com"),
            workload_entry("vm-1", address="10.0.0.9", labels={"app": "payments"}),
            service_entry(  # the engine resolves DNS names as it takes them; this sandbox has no DNS
                "api", hosts=["api.example.com"], ports=[{"number": 80}], resolution="DNS",
                endpoints=[{"address": "localhost"}],
            ),
            service_entry(
                "g", hosts=["g.example.com"], ports=[{"number": 82, "protocol": "GRPC"}],
                resolution="STATIC", endpoints=[{"address": "127.0.0.1"}],
            ),
            service_entry(
                "m", hosts=["m.example.com"], ports=[{"number": 81}], resolution="DNS_ROUND_ROBIN",
                endpoints=[{"address": "localhost"}],
            ),
        ],
    ],
    ids=["empty", "subsets", "split", "everything", "service-entries"],
)
def test_the_engine_accepts_what_the_compiler_produces(engine, resources):
    from meshctl._core import ConfigError

    instance = reviews("v1", 8001)
    compiled = to_messages(sidecar_resources(compile_mesh(resources, REGISTRY), instance))
    # Ports 0: nothing binds anything real on this machine for a validation test.
    for listener in compiled[types.LISTENER]:
        listener.address.socket_address.port_value = 0
    try:
        for type_url in (t for t in types.ORDER if t in compiled):  # the compiler makes no secrets
            engine.apply(type_url, [message.SerializeToString() for message in compiled[type_url]])
    finally:
        engine.remove(types.LISTENER, [OUTBOUND_LISTENER, INBOUND_LISTENER])
    with pytest.raises(ConfigError):  # and it is not a rubber stamp
        engine.apply(types.ROUTE, [compiled[types.ROUTE][0].SerializeToString() + b"\xff"])
