"""What Istio's workload-scoped kinds (PeerAuthentication, AuthorizationPolicy, Telemetry) share: the
root namespace, the matchLabels selector, the mesh / namespace / workload precedence, and the
refusal of targetRef(s)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, Field

from meshctl.resources.common import MeshModel
from meshctl.resources.support import Unsupported

T = TypeVar("T")

# Istio's default root namespace: a policy here without a selector applies to the whole mesh.
# meshctl keeps Istio's name (rather than inventing a meshctl-system) so Istio files apply unchanged.
ROOT_NAMESPACE = "istio-system"


def _label_value(value: str) -> str:
    if "*" in value:
        raise ValueError(
            f"{value!r}: wildcards are not supported in a selector (Istio refuses them too)"
        )
    return value


class WorkloadSelector(MeshModel):
    """Istio's security selector: the workloads whose labels include all of these (app, version, ...)."""

    match_labels: dict[
        Annotated[str, Field(min_length=1)], Annotated[str, AfterValidator(_label_value)]
    ] = Field(default_factory=dict)


def selects(selector: WorkloadSelector | None, labels: dict[str, str]) -> bool:
    """No selector, or an empty one, selects every workload (Istio's namespace-wide policy)."""
    if selector is None:
        return True
    return all(labels.get(key) == value for key, value in selector.match_labels.items())


def has_selector(selector: WorkloadSelector | None) -> bool:
    return selector is not None and bool(selector.match_labels)


def scope_levels(
    resources: Iterable[Any], namespace: str, labels: Mapping[str, str], says: Callable[[Any], T | None]
) -> tuple[T | None, T | None, T | None]:
    """Istio's three levels for a workload in `namespace` with `labels`: (mesh, namespace, workload),
    each what the oldest resource at that level `says` (None: it says nothing, and the next one at
    its level counts). Mesh: the root namespace, no selector; namespace: its namespace, no selector;
    workload: its namespace, a selector that selects it (in the root namespace, as in Istio, a
    selector makes no mesh-wide workload policy). `resources`: oldest first, each with .namespace
    and .spec.selector."""
    mesh = namespace_wide = workload = None
    for resource in resources:
        said = says(resource)
        if said is None:
            continue
        if not has_selector(resource.spec.selector):
            if resource.namespace == ROOT_NAMESPACE:
                mesh = mesh if mesh is not None else said
            elif resource.namespace == namespace:
                namespace_wide = namespace_wide if namespace_wide is not None else said
        elif (
            resource.namespace == namespace
            and namespace != ROOT_NAMESPACE
            and selects(resource.spec.selector, dict(labels))
        ):
            workload = workload if workload is not None else said
    return mesh, namespace_wide, workload


# Istio's targetRef(s) (Gateway API attachment) in place of a selector: not supported yet.
TargetRefUnsupported = Annotated[
    Any, Unsupported("targetRef is not supported yet; select workloads with selector")
]
TargetRefsUnsupported = Annotated[
    Any, Unsupported("targetRefs is not supported yet; select workloads with selector")
]
