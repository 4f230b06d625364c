"""What PeerAuthentication and AuthorizationPolicy share: the root namespace and the matchLabels selector."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field

from meshctl.resources.common import MeshModel

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
