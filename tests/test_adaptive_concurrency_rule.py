"""A RateLimit's adaptive concurrency rule (`concurrency: {adaptive: true}`): compiled to Envoy's
adaptive concurrency filter on the selected workloads' inbound connection manager, refused by field
where it cannot mean anything, and end to end: `meshctl serve` compiles it, the reviews sidecar
(`meshctl run --service`) gets it over ADS, and an overload of its slow app is shed there."""

from __future__ import annotations

import re
import urllib.request

import pytest
import yaml
from helpers.control_plane import start_control_plane
from helpers.mesh import MeshSidecar, apply, print_logs, stop_all, wait_until
from helpers.overload import SlotApp, overload, p99
from helpers.ports import free_port
from meshctl.control import resource_types as types
from meshctl.control.compiler import INBOUND_LISTENER, compile_mesh, sidecar_resources
from meshctl.control.registry import Sidecar
from meshctl.resources import ValidationFailed, validate_documents

AC_TYPE = "type.googleapis.com/envoy.extensions.filters.http.adaptive_concurrency.v3.AdaptiveConcurrency"
ADAPTIVE = {
    "apiVersion": "policy.meshctl.io/v1alpha1", "kind": "RateLimit",
    "metadata": {"name": "reviews-adaptive", "namespace": "default"},
    "spec": {
        "selector": {"matchLabels": {"app": "reviews"}},
        "rules": [{"concurrency": {"adaptive": True, "maxConcurrent": 200, "latencyPercentile": 90,
                                   "minRttRequests": 20}}],
    },
}  # fmt: skip


def inbound_manager(rate_limit: dict) -> tuple[dict, list[dict]]:
    """The compiled inbound connection manager of a reviews sidecar, and its clusters."""
    reviews = Sidecar(node_id="reviews-v1", service="reviews", version="v1", service_port=9080,
                      app_port=8080, inbound_port=15006, ready=True)  # fmt: skip
    compiled = sidecar_resources(compile_mesh([rate_limit], [reviews]), reviews)
    [listener] = [x for x in compiled[types.LISTENER] if x["name"] == INBOUND_LISTENER]
    return listener["filter_chains"][0]["filters"][0]["typed_config"], compiled[types.CLUSTER]


def test_an_adaptive_rule_is_envoys_filter_before_the_router_and_no_breaker():
    manager, clusters = inbound_manager(ADAPTIVE)
    names = [f["name"] for f in manager["http_filters"]]
    assert names[-2:] == ["envoy.filters.http.adaptive_concurrency", "envoy.filters.http.router"], names
    assert manager["http_filters"][-2]["typed_config"] == {
        "@type": AC_TYPE,
        "gradient_controller_config": {
            "sample_aggregate_percentile": {"value": 90},
            "concurrency_limit_params": {"max_concurrency_limit": 200, "concurrency_update_interval": "0.5s"},
            "min_rtt_calc_params": {"request_count": 20},
        },
    }  # fmt: skip
    [local] = [c for c in clusters if c["name"].startswith("inbound|")]
    assert "circuit_breakers" not in local


def test_an_adaptive_rule_with_defaults_and_beside_a_fixed_limit():
    rules = [{"concurrency": {"adaptive": True, "updateInterval": "1s", "minRttInterval": "30s"}},
             {"concurrency": {"maxConcurrent": 50}}]  # fmt: skip
    manager, clusters = inbound_manager({**ADAPTIVE, "spec": {**ADAPTIVE["spec"], "rules": rules}})
    gradient = manager["http_filters"][-2]["typed_config"]["gradient_controller_config"]
    assert gradient == {"concurrency_limit_params": {"concurrency_update_interval": "1s"},
                        "min_rtt_calc_params": {"interval": "30s"}}  # fmt: skip
    # The fixed limit is the app cluster's breaker, as without the adaptive rule.
    [local] = [c for c in clusters if c["name"].startswith("inbound|")]
    assert local["circuit_breakers"]["thresholds"][0]["max_requests"] == 50


@pytest.mark.parametrize(
    ("concurrency", "extra", "field", "reason"),
    [
        ({"adaptive": True, "queue": 2}, {}, "spec.rules[0].concurrency.queue", "queues nothing"),
        ({"adaptive": True, "queueTimeout": "1s"}, {}, "spec.rules[0].concurrency.queueTimeout", "queues nothing"),
        ({"adaptive": True}, {"match": {"path": {"prefix": "/api"}}}, "spec.rules[0].match", "no per-route config"),
        ({"adaptive": True, "latencyPercentile": 0}, {}, "spec.rules[0].concurrency.latencyPercentile", "greater than 0"),
        ({"adaptive": True, "latencyPercentile": 101}, {}, "spec.rules[0].concurrency.latencyPercentile", "less than or equal to 100"),
        ({"adaptive": True, "maxConcurrent": 2}, {}, "spec.rules[0].concurrency.maxConcurrent", "at least 3"),
        ({"adaptive": True, "updateInterval": "0s"}, {}, "spec.rules[0].concurrency.updateInterval", "more than 0s"),
        ({"adaptive": True, "minRttRequests": 0}, {}, "spec.rules[0].concurrency.minRttRequests", "greater than or equal to 1"),
        ({"adaptive": "sometimes"}, {}, "spec.rules[0].concurrency.adaptive", "boolean"),
        ({}, {}, "spec.rules[0].concurrency.maxConcurrent", "adaptive: true"),
        ({"maxConcurrent": 5, "latencyPercentile": 90}, {}, "spec.rules[0].concurrency.latencyPercentile", "adaptive: true only"),
    ],
)  # fmt: skip
def test_bad_adaptive_rules_are_refused_naming_the_field(concurrency, extra, field, reason):
    document = {**ADAPTIVE, "spec": {**ADAPTIVE["spec"], "rules": [{"concurrency": concurrency, **extra}]}}
    with pytest.raises(ValidationFailed) as caught:
        validate_documents(yaml.safe_dump(document))
    issues = [str(issue) for issue in caught.value.issues]
    assert any(f": {field}" in issue and reason in issue for issue in issues), issues


def test_two_adaptive_rules_in_one_rate_limit_are_refused():
    rules = [{"concurrency": {"adaptive": True}}, {"concurrency": {"adaptive": True, "maxConcurrent": 9}}]
    with pytest.raises(ValidationFailed) as caught:
        validate_documents(yaml.safe_dump({**ADAPTIVE, "spec": {**ADAPTIVE["spec"], "rules": rules}}))
    assert any("spec.rules[1].concurrency.adaptive" in str(i) and "already adaptive" in str(i) for i in caught.value.issues)


SLOTS = 4
SERVICE_SECONDS = 0.1
RULE = """
apiVersion: policy.meshctl.io/v1alpha1
kind: RateLimit
metadata: {name: reviews-adaptive}
spec:
  selector: {matchLabels: {app: reviews}}
  rules:
  - concurrency: {adaptive: true, maxConcurrent: 100, minRttRequests: 20}
"""


def adaptive_stats(sidecar: MeshSidecar) -> dict[str, int]:
    """The sidecar's adaptive concurrency stats for its inbound listener; none before it serves."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{sidecar.admin_port}/stats/prometheus", timeout=3) as response:
            text = response.read().decode()
    except OSError:
        return {}
    found = re.findall(r'^meshctl_http_adaptive_concurrency_(\w+)\{stat_prefix="inbound"\} (\d+)$', text, re.MULTILINE)
    return {name: int(value) for name, value in found}


def test_meshctl_serve_and_run_shed_an_overload_of_a_slow_app(tmp_path):
    plane = start_control_plane(tmp_path / "plane", "--xds-port", "0")
    app = SlotApp(SLOTS, SERVICE_SECONDS)
    inbound = free_port()
    reviews = MeshSidecar(plane.env, tmp_path, "reviews", "--version", "v1", "--app-port", str(app.port),
                          "--service-port", "9080", "--inbound-port", str(inbound))  # fmt: skip
    try:
        apply(plane, RULE)
        wait_until(lambda: "limit" in adaptive_stats(reviews), 30, "the reviews sidecar's engine has the filter", step=0.3)
        app.reset_peak()
        replies = overload(inbound, "reviews:9080", 8 * SLOTS, seconds=5.0, pause_after_refusal=0.1)
        stats = adaptive_stats(reviews)
        served, shed = replies.seconds(200), replies.seconds(503)
        print(f"{len(served)} served (p99 {p99(served):.3f}s), {len(shed)} shed, app peak {app.peak}, {stats}")
        assert len(served) + len(shed) == len(replies.all)
        # As in test_adaptive_concurrency.py (the bounds and why).
        assert SLOTS <= app.peak <= 4 * SLOTS
        assert p99(served) < 4 * SERVICE_SECONDS + 0.2
        assert shed and p99(shed) < SERVICE_SECONDS / 2
        assert stats["rq_blocked_total"] == len(shed)
    except BaseException:
        print_logs([reviews], {"": plane})
        raise
    finally:
        stop_all([reviews], plane)
        app.stop()
