"""The Telemetry kind (telemetry.istio.io): Istio's files accepted as written, bad fields refused by
name (sampling over 100 %, unknown providers, a bad mode, an expression the sidecars cannot run),
and its accessLogging compiled into the sidecars' connection managers by direction and precedence."""

from __future__ import annotations

import pytest

from meshctl.control import compiler_access_log as access_log
from meshctl.control.compiler import INBOUND_LISTENER, OUTBOUND_LISTENER, compile_mesh, sidecar_resources
from meshctl.control import resource_types as types
from meshctl.control.registry import Sidecar
from meshctl.resources import ValidationFailed, extension_providers, resolve_kind, validate_documents


def telemetry(spec: str, *, namespace: str = "shop", name: str = "logs") -> str:
    return f"apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec: {spec}\n"


@pytest.fixture(autouse=True)
def tracing_provider():
    """The control plane's providers, as `meshctl serve --tracing-provider` sets them."""
    extension_providers.configure([extension_providers.parse_provider("opentelemetry=otel-collector.observability:4317")])
    yield
    extension_providers.configure([])


def test_istio_telemetry_files_are_accepted_as_written() -> None:
    documents = "---\n".join([
        telemetry("{accessLogging: [{providers: [{name: envoy}]}]}", namespace="istio-system", name="mesh-default"),
        telemetry("{selector: {matchLabels: {app: reviews}}, accessLogging: [{match: {mode: SERVER}, "
                  "filter: {expression: 'response.code >= 400'}, providers: [{name: envoy-json}]}]}"),
        telemetry("{tracing: [{randomSamplingPercentage: 10.5, customTags: {team: {literal: {value: shop}}}, "
                  "providers: [{name: opentelemetry}]}], metrics: [{providers: [{name: prometheus}]}]}", name="traces"),
        telemetry("{accessLogging: [{disabled: true}]}", name="quiet").replace("telemetry.istio.io/v1", "telemetry.istio.io/v1alpha1"),
    ])  # fmt: skip
    resources = validate_documents(documents)
    assert [r.ref.kind for r in resources] == ["Telemetry"] * 4
    assert resources[1].body["spec"]["accessLogging"][0]["filter"] == {"expression": "response.code >= 400"}
    # Metrics are stored and shown as not enforced yet; tracing is compiled.
    assert resources[2].not_enforced == ("spec.metrics",)
    assert resolve_kind("telemetry").kind == "Telemetry"


INVALID = {
    "sampling-101": (telemetry("{tracing: [{randomSamplingPercentage: 101}]}"), "spec.tracing[0].randomSamplingPercentage", "less than or equal to 100"),
    "sampling-negative": (telemetry("{tracing: [{randomSamplingPercentage: -1}]}"), "spec.tracing[0].randomSamplingPercentage", "greater than or equal to 0"),
    "unknown-log-provider": (telemetry("{accessLogging: [{providers: [{name: stackdriver}]}]}"), "spec.accessLogging[0].providers[0].name", "unknown provider 'stackdriver'"),
    "unknown-trace-provider": (telemetry("{tracing: [{providers: [{name: skywalking}]}]}"), "spec.tracing[0].providers[0].name", "unknown provider 'skywalking'"),
    "bad-mode": (telemetry("{accessLogging: [{match: {mode: BOTH}}]}"), "spec.accessLogging[0].match.mode", "CLIENT"),
    "cel-expression": (telemetry("{accessLogging: [{filter: {expression: 'request.headers[\"x\"] == \"1\"'}}]}"), "spec.accessLogging[0].filter.expression", "not supported"),
    "target-refs": (telemetry("{targetRefs: [{kind: Service, name: r}]}"), "spec.targetRefs", "not supported yet"),
    "typo": (telemetry("{accessLoging: []}"), "spec.accessLoging", "unknown field"),
}


@pytest.mark.parametrize("document, path, reason", INVALID.values(), ids=INVALID.keys())
def test_invalid_telemetry_names_resource_field_and_reason(document: str, path: str, reason: str) -> None:
    with pytest.raises(ValidationFailed) as caught:
        validate_documents(document)
    issues = caught.value.issues
    assert any(
        issue.where == "Telemetry shop/logs" and issue.field.startswith(path) and reason in issue.reason for issue in issues
    ), [str(issue) for issue in issues]


def test_status_expressions_become_envoy_comparisons() -> None:
    from meshctl.resources.telemetry import status_filter

    assert status_filter("response.code >= 400") == ("GE", 400)
    assert status_filter(" response.code > 499 ") == ("GE", 500)
    assert status_filter("response.code < 300") == ("LE", 299)
    assert status_filter("response.code == 503") == ("EQ", 503)
    assert status_filter("response.code >= 400 && x") is None


REVIEWS = Sidecar(node_id="reviews", service="reviews", namespace="shop", service_port=9080, app_port=8001, inbound_port=9001, ready=True)  # fmt: skip
RATINGS = Sidecar(node_id="ratings", service="ratings", namespace="shop", service_port=9080, app_port=8002, inbound_port=9002, ready=True)  # fmt: skip
OTHER = Sidecar(node_id="other", service="other", namespace="web", service_port=9080, app_port=8003, inbound_port=9003, ready=True)  # fmt: skip


def stored(text: str) -> list[dict]:
    return [resource.body for resource in validate_documents(text)]


def logs_of(resources: list[dict], sidecar: Sidecar) -> dict[str, list[dict]]:
    listeners = sidecar_resources(compile_mesh(resources, [REVIEWS, RATINGS, OTHER]), sidecar)[types.LISTENER]
    found = {}
    for listener in listeners:
        manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
        found[listener["name"]] = manager.get("access_log", [])
    return found


def test_precedence_workload_over_namespace_over_mesh_and_modes() -> None:
    mesh_wide = telemetry("{accessLogging: [{providers: [{name: envoy}]}]}", namespace="istio-system", name="mesh")
    namespace_json = telemetry("{accessLogging: [{providers: [{name: envoy-json}], match: {mode: CLIENT}}]}", name="ns")
    reviews_off = telemetry("{selector: {matchLabels: {app: reviews}}, accessLogging: [{disabled: true}]}", name="reviews")
    resources = stored("---\n".join([mesh_wide, namespace_json, reviews_off]))

    # The web namespace has only the mesh's: Envoy's default text, both directions.
    other = logs_of(resources, OTHER)
    assert [log["typed_config"].get("log_format") for log in other[OUTBOUND_LISTENER]] == [None]
    assert [log["typed_config"]["@type"] for log in other[INBOUND_LISTENER]] == [access_log.STDERR_TYPE]
    # shop: its namespace-wide JSON logger on the client side; the server side falls back to the mesh's.
    ratings = logs_of(resources, RATINGS)
    assert ratings[OUTBOUND_LISTENER][0]["typed_config"]["log_format"]["json_format"]["response_flags"] == "%RESPONSE_FLAGS%"
    assert ratings[INBOUND_LISTENER][0]["typed_config"].get("log_format") is None
    # reviews' own Telemetry turns it off in both directions.
    assert logs_of(resources, REVIEWS) == {OUTBOUND_LISTENER: [], INBOUND_LISTENER: []}
    # No Telemetry: nothing at all.
    assert logs_of([], RATINGS) == {OUTBOUND_LISTENER: [], INBOUND_LISTENER: []}


def test_filter_expression_compiles_to_a_status_code_filter() -> None:
    resources = stored(telemetry("{accessLogging: [{filter: {expression: 'response.code >= 500'}}]}"))
    (log,) = logs_of(resources, RATINGS)[OUTBOUND_LISTENER]
    assert log["filter"]["status_code_filter"]["comparison"]["op"] == "GE"
    assert log["filter"]["status_code_filter"]["comparison"]["value"]["default_value"] == 500
