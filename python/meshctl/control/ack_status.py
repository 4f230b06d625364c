"""What each node did with the xDS it was sent: the last version it accepted, the last it refused and why."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TypeAckState:
    acked_version: str | None = None
    nacked_version: str | None = None
    error: str | None = None


class AckStatus:
    """ACK/NACK bookkeeping per node and type URL. A NACK stays on record until the node accepts
    a newer version; the running config is then the accepted one, so the rejection is history."""

    def __init__(self) -> None:
        self._nodes: dict[str, dict[str, TypeAckState]] = {}

    def record_ack(self, node_id: str, type_url: str, version: str) -> None:
        state = self._state(node_id, type_url)
        state.acked_version = version
        state.nacked_version = None
        state.error = None

    def record_nack(self, node_id: str, type_url: str, version: str, error: str) -> None:
        state = self._state(node_id, type_url)
        state.nacked_version = version
        state.error = error

    def as_dict(self) -> dict[str, dict[str, dict[str, str | None]]]:
        return {
            node_id: {type_url: vars(state).copy() for type_url, state in types.items()}
            for node_id, types in self._nodes.items()
        }

    def _state(self, node_id: str, type_url: str) -> TypeAckState:
        return self._nodes.setdefault(node_id, {}).setdefault(type_url, TypeAckState())
