"""Validation problems that name the resource, the field path and the reason."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class ResourceRef:
    """Which resource: kind, namespace and name (the identity the store keys on)."""

    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


@dataclass(frozen=True)
class Issue:
    """One problem. `where` is the resource, or the document when no resource could be named."""

    where: str
    field: str
    reason: str

    def __str__(self) -> str:
        return (
            f"{self.where}: {self.field}: {self.reason}"
            if self.field
            else f"{self.where}: {self.reason}"
        )

    def as_json(self) -> dict[str, str]:
        return {"resource": self.where, "field": self.field, "reason": self.reason}


class ValidationFailed(Exception):
    """The batch is refused; every issue found is listed, not only the first."""

    def __init__(self, issues: list[Issue]) -> None:
        super().__init__("\n".join(str(issue) for issue in issues))
        self.issues = issues


def field_path(location: tuple[str | int, ...]) -> str:
    """('spec', 'http', 0, 'route') -> 'spec.http[0].route', the way Istio's docs name fields."""
    text = ""
    for part in location:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text
