"""Invalid bootstraps, each with the words a clear error must contain, and whether Envoy refuses it."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

from .bootstrap import Json, cluster, simple_proxy

LUA_TYPE = "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua"
LRL_TYPE = "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"
LRL_NAME = "envoy.filters.http.local_ratelimit"
FAULT_TYPE = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"


@dataclass
class Invalid:
    id: str
    # Either a mutation of a valid bootstrap dict, or the raw file text.
    mutate: Callable[[Json], None] | None = None
    text: str | None = None
    # Each entry must appear in stderr (case-insensitive); "a|b" accepts either.
    names: tuple[str, ...] = ()
    envoy_refuses: bool = True
    why: str = ""


def _listener(config: Json) -> Json:
    return config["static_resources"]["listeners"][0]


def _hcm(config: Json) -> Json:
    return _listener(config)["filter_chains"][0]["filters"][0]["typed_config"]


def _route(config: Json) -> Json:
    return _hcm(config)["route_config"]["virtual_hosts"][0]["routes"][0]


def _set_port(value) -> Callable[[Json], None]:
    def mutate(config: Json) -> None:
        _listener(config)["address"]["socket_address"]["port_value"] = value

    return mutate


def _weights_zero(config: Json) -> None:
    config["static_resources"]["clusters"].append(cluster("other", 1))
    _route(config)["route"] = {
        "weighted_clusters": {"clusters": [{"name": "upstream", "weight": 0}, {"name": "other", "weight": 0}]}
    }


def _local_rate_limit(**fields) -> Callable[[Json], None]:
    """The local rate limit filter before the router, with `fields` (a valid bucket unless given)."""

    def mutate(config: Json) -> None:
        typed = {"@type": LRL_TYPE, "stat_prefix": "lrl",
                 "token_bucket": {"max_tokens": 5, "fill_interval": "1s"}, **fields}  # fmt: skip
        _hcm(config)["http_filters"].insert(0, {"name": LRL_NAME, "typed_config": typed})

    return mutate


RL_TYPE = "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit"


def _global_rate_limit(service_cluster: str = "rls", grpc_service: Json | None = None, **fields) -> Callable[[Json], None]:
    """The global rate limit filter before the router, asking an h2c cluster `rls`, with `fields`."""

    def mutate(config: Json) -> None:
        config["static_resources"]["clusters"].append(cluster("rls", 1, http2=True))
        grpc = grpc_service if grpc_service is not None else {"envoy_grpc": {"cluster_name": service_cluster}}
        typed = {"@type": RL_TYPE, "domain": "test", **fields,
                 "rate_limit_service": {"grpc_service": grpc, "transport_api_version": "V3"}}  # fmt: skip
        _hcm(config)["http_filters"].insert(0, {"name": "envoy.filters.http.ratelimit", "typed_config": typed})

    return mutate


def _route_rate_limit_without_bucket(config: Json) -> None:
    _local_rate_limit()(config)
    _route(config)["typed_per_filter_config"] = {LRL_NAME: {"@type": LRL_TYPE, "stat_prefix": "route"}}


def _unsupported_rate_limit_action(config: Json) -> None:
    _local_rate_limit()(config)
    _route(config)["route"]["rate_limits"] = [{"actions": [{"source_cluster": {}}]}]


AC_TYPE = "type.googleapis.com/envoy.extensions.filters.http.adaptive_concurrency.v3.AdaptiveConcurrency"


def _adaptive_concurrency(**gradient) -> Callable[[Json], None]:
    """The adaptive concurrency filter before the router with `gradient` (its controller config)."""

    def mutate(config: Json) -> None:
        typed = {"@type": AC_TYPE, "gradient_controller_config": gradient}
        _hcm(config)["http_filters"].insert(0, {"name": "envoy.filters.http.adaptive_concurrency", "typed_config": typed})

    return mutate


EVERY_SECOND = {"concurrency_update_interval": "1s"}


def _fault_config_on_virtual_host(config: Json) -> None:
    vhost = _hcm(config)["route_config"]["virtual_hosts"][0]
    vhost["typed_per_filter_config"] = {"envoy.filters.http.fault": {"@type": FAULT_TYPE}}


def _duplicate_listener(config: Json) -> None:
    second = copy.deepcopy(_listener(config))
    second["address"]["socket_address"]["port_value"] += 1
    config["static_resources"]["listeners"].append(second)


def _lua_filter(config: Json) -> None:
    _hcm(config)["http_filters"].insert(
        0, {"name": "envoy.filters.http.lua", "typed_config": {"@type": LUA_TYPE, "default_source_code": {"inline_string": "function envoy_on_request(h) end"}}}
    )


def _mirror_by_header(config: Json) -> None:
    # Mirroring itself is supported; choosing the mirror cluster by a request header is not.
    _route(config)["route"]["request_mirror_policies"] = [{"cluster_header": "x-mirror-to"}]


def _connect_route(config: Json) -> None:
    # Envoy's way to forward CONNECT: the CONNECT upgrade on, a route that matches CONNECT.
    _hcm(config)["upgrade_configs"] = [{"upgrade_type": "CONNECT"}]
    _hcm(config)["route_config"]["virtual_hosts"][0]["routes"].insert(
        0, {"match": {"connect_matcher": {}}, "route": {"cluster": "upstream", "upgrade_configs": [{"upgrade_type": "CONNECT"}]}}
    )


CASES = [
    Invalid("unknown-field", lambda c: _listener(c).update(bogus_field=1), names=("bogus_field",)),
    Invalid("wrong-type", _set_port("eighty"), names=("port_value",)),
    Invalid("listener-without-address", lambda c: _listener(c).pop("address"), names=("address",)),
    Invalid("port-out-of-range", _set_port(70000), names=("port_value",)),
    Invalid(
        "route-to-undefined-cluster",
        lambda c: _route(c)["route"].update(cluster="nowhere"),
        names=("nowhere", "cluster"),
    ),
    Invalid("weights-sum-to-zero", _weights_zero, names=("weight",)),
    Invalid(
        "bad-regex",
        lambda c: _route(c).update(match={"safe_regex": {"regex": "^/(unclosed"}}),
        names=("regex",),
    ),
    Invalid(
        "duplicate-listener-names",
        _duplicate_listener,
        names=("http", "name|duplicate"),
        envoy_refuses=False,
        why="Envoy 1.40 keeps the first listener and silently ignores the second; meshctl refuses",
    ),
    Invalid("cluster-without-name", lambda c: c["static_resources"]["clusters"][0].pop("name"), names=("name",)),
    Invalid(
        "unknown-enum-value",
        lambda c: c["static_resources"]["clusters"][0].update(lb_policy="NOT_A_POLICY"),
        names=("lb_policy",),
    ),
    Invalid(
        "virtual-host-without-domains",
        lambda c: _hcm(c)["route_config"]["virtual_hosts"][0].update(domains=[]),
        names=("domains",),
    ),
    Invalid(
        "negative-duration",
        lambda c: c["static_resources"]["clusters"][0].update(connect_timeout="-1s"),
        names=("connect_timeout",),
    ),
    Invalid(
        "duplicate-cluster-names",
        lambda c: c["static_resources"]["clusters"].append(copy.deepcopy(c["static_resources"]["clusters"][0])),
        names=("upstream", "name|duplicate"),
    ),
    Invalid(
        "unknown-typed-config",
        lambda c: _hcm(c)["http_filters"].insert(
            0, {"name": "x.nothing", "typed_config": {"@type": "type.googleapis.com/x.does.not.Exist"}}
        ),
        names=("x.does.not.Exist|typed_config|@type",),
    ),
    Invalid(
        "unsupported-http-filter",
        _lua_filter,
        names=("lua|http_filters",),
        envoy_refuses=False,
        why="Envoy runs Lua; meshctl has no Lua filter and must refuse rather than skip it",
    ),
    Invalid(
        "unsupported-behaviour-field",
        _mirror_by_header,
        names=("request_mirror_policies", "cluster_header"),
        envoy_refuses=False,
        why="a mirror cluster named by a request header changes behaviour; meshctl must refuse rather than drop it",
    ),
    Invalid(
        "connect-upgrade",
        lambda c: _hcm(c).update(upgrade_configs=[{"upgrade_type": "CONNECT"}]),
        names=("upgrade_configs[0].upgrade_type", "connect"),
        envoy_refuses=False,
        why="Envoy accepts CONNECT handling; meshctl has no CONNECT forwarding or termination and must refuse",
    ),
    Invalid(
        "connect-matcher-route",
        _connect_route,
        names=("upgrade_configs[0].upgrade_type|connect_matcher",),
        envoy_refuses=False,
        why="Envoy forwards CONNECT on a connect_matcher route; meshctl must refuse rather than answer 404",
    ),
    Invalid(
        "unknown-retry-condition",
        lambda c: _route(c)["route"].update(retry_policy={"retry_on": "5xx,sometimes"}),
        names=("retry_policy.retry_on", "sometimes"),
        envoy_refuses=False,
        why="Envoy 1.40 ignores a retry_on condition it does not know; meshctl refuses rather than drop it",
    ),
    Invalid(
        "retry-backoff-max-below-base",
        lambda c: _route(c)["route"].update(
            retry_policy={"retry_on": "5xx", "retry_back_off": {"base_interval": "0.1s", "max_interval": "0.05s"}}
        ),
        names=("retry_back_off.max_interval",),
    ),
    Invalid(
        "retry-backoff-below-1ms",
        lambda c: _route(c)["route"].update(retry_policy={"retry_on": "5xx", "retry_back_off": {"base_interval": "0.0005s"}}),
        names=("retry_back_off.base_interval",),
        envoy_refuses=False,
        why="Envoy counts backoff in whole milliseconds, so 0.5 ms is a base of 0; meshctl refuses it",
    ),
    Invalid(
        "retriable-headers",
        lambda c: _route(c)["route"].update(retry_policy={"retry_on": "5xx", "retriable_headers": [{"name": "x-retry"}]}),
        names=("retry_policy.retriable_headers",),
        envoy_refuses=False,
        why="Envoy retries on response headers; meshctl does not yet and must refuse",
    ),
    Invalid(
        "circuit-breakers-high-priority",
        lambda c: c["static_resources"]["clusters"][0].update(circuit_breakers={"thresholds": [{"priority": "HIGH", "max_connections": 1}]}),
        names=("circuit_breakers.thresholds[0].priority",),
        envoy_refuses=False,
        why="HIGH thresholds apply to HIGH priority routes, which meshctl does not have",
    ),
    Invalid(
        "retry-budget-over-100-percent",
        lambda c: c["static_resources"]["clusters"][0].update(
            circuit_breakers={"thresholds": [{"retry_budget": {"budget_percent": {"value": 150}}}]}
        ),
        names=("budget_percent",),
    ),
    Invalid(
        "local-ratelimit-fill-interval-below-50ms",
        _local_rate_limit(token_bucket={"max_tokens": 5, "fill_interval": "0.01s"}),
        names=("token_bucket.fill_interval", "50ms"),
    ),
    Invalid(
        "local-ratelimit-per-route-without-bucket",
        _route_rate_limit_without_bucket,
        names=("typed_per_filter_config", "token_bucket"),
    ),
    Invalid(
        "local-ratelimit-x-ratelimit-headers",
        _local_rate_limit(enable_x_ratelimit_headers="DRAFT_VERSION_03"),
        names=("enable_x_ratelimit_headers",),
        envoy_refuses=False,
        why="Envoy adds x-ratelimit-* headers; meshctl does not yet and must refuse rather than omit them",
    ),
    Invalid(
        "local-ratelimit-dynamic-descriptor",
        _local_rate_limit(descriptors=[{"entries": [{"key": "user"}], "token_bucket": {"max_tokens": 1, "fill_interval": "1s"}}]),
        names=("descriptors[0].entries[0].value", "dynamic"),
        envoy_refuses=False,
        why="an empty value is Envoy's dynamic descriptor (a bucket per value); meshctl does not have it",
    ),
    Invalid(
        "rate-limit-action-source-cluster",
        _unsupported_rate_limit_action,
        names=("rate_limits[0].actions[0].source_cluster",),
        envoy_refuses=False,
        why="a descriptor from the source cluster would limit differently; meshctl must refuse rather than skip it",
    ),
    Invalid(
        "fault-config-on-virtual-host",
        _fault_config_on_virtual_host,
        names=("virtual_hosts[0].typed_per_filter_config",),
        envoy_refuses=False,
        why="meshctl takes only the local rate limit filter's config on a virtual host (the fault filter's only per route)",
    ),
    Invalid(
        "global-ratelimit-google-grpc",
        _global_rate_limit(grpc_service={"google_grpc": {"target_uri": "127.0.0.1:1", "stat_prefix": "rls"}}),
        names=("google_grpc",),
        envoy_refuses=False,
        why="meshctl reaches the rate limit service only through a cluster (envoy_grpc)",
    ),
    Invalid(
        "global-ratelimit-unknown-cluster",
        _global_rate_limit("nowhere"),
        names=("envoy_grpc.cluster_name", "nowhere"),
        envoy_refuses=False,
        why="Envoy 1.40 accepts it and fails every call (error, fail open); meshctl refuses a service it cannot reach",
    ),
    Invalid(
        "global-ratelimit-stage",
        _global_rate_limit(stage=11),
        names=("stage",),
        envoy_refuses=True,
        why="Envoy's stages are 0 to 10",
    ),
    Invalid(
        "global-ratelimit-empty-domain",
        _global_rate_limit(domain=""),
        names=("domain",),
        why="Envoy requires a domain",
    ),
    Invalid(
        "adaptive-concurrency-without-min-rtt-params",
        _adaptive_concurrency(concurrency_limit_params=EVERY_SECOND),
        names=("min_rtt_calc_params",),
    ),
    Invalid(
        "adaptive-concurrency-without-update-interval",
        _adaptive_concurrency(concurrency_limit_params={}, min_rtt_calc_params={}),
        names=("concurrency_update_interval",),
    ),
    Invalid(
        "adaptive-concurrency-percentile-over-100",
        _adaptive_concurrency(sample_aggregate_percentile={"value": 120}, concurrency_limit_params=EVERY_SECOND, min_rtt_calc_params={}),
        names=("sample_aggregate_percentile",),
    ),
    Invalid(
        "adaptive-concurrency-no-min-rtt",
        _adaptive_concurrency(concurrency_limit_params=EVERY_SECOND, min_rtt_calc_params={"interval": "0s"}),
        names=("fixed_value",),
        why="with interval 0s the minimum RTT is not measured: it must be given",
    ),
    Invalid("empty-file", text="", names=("empty|static_resources|bootstrap",)),
    Invalid("malformed-yaml", text="static_resources: {listeners: [\n  - name: x\n    address: {\n", names=("yaml",)),
]


def base_bootstrap(listener_port: int, upstream_port: int) -> Json:
    return simple_proxy(listener_port, upstream_port)
