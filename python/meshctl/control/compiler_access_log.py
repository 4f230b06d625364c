"""Telemetry accessLogging → the access_log of sidecars' connection managers (CLIENT: outbound, SERVER: inbound)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from meshctl.resources.security_common import scope_levels
from meshctl.resources.telemetry import AccessLogging, status_filter

Json = dict[str, Any]

STDERR_TYPE = "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StderrAccessLog"

# Istio's JSON access log fields (its default JSON encoding), minus those meshctl's sidecar
# cannot fill yet (transport failure reasons, local addresses).
ISTIO_JSON_FIELDS = {
    "start_time": "%START_TIME%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "protocol": "%PROTOCOL%",
    "response_code": "%RESPONSE_CODE%",
    "response_flags": "%RESPONSE_FLAGS%",
    "response_code_details": "%RESPONSE_CODE_DETAILS%",
    "bytes_received": "%BYTES_RECEIVED%",
    "bytes_sent": "%BYTES_SENT%",
    "duration": "%DURATION%",
    "upstream_service_time": "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
    "x_forwarded_for": "%REQ(X-FORWARDED-FOR)%",
    "user_agent": "%REQ(USER-AGENT)%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "authority": "%REQ(:AUTHORITY)%",
    "upstream_host": "%UPSTREAM_HOST%",
    "upstream_cluster": "%UPSTREAM_CLUSTER%",
    "downstream_remote_address": "%DOWNSTREAM_REMOTE_ADDRESS%",
    "requested_server_name": "%REQUESTED_SERVER_NAME%",
    "route_name": "%ROUTE_NAME%",
}

CLIENT, SERVER = "CLIENT", "SERVER"


def _provider(name: str) -> Json:
    config: Json = {"@type": STDERR_TYPE}
    if name == "envoy-json":
        config["log_format"] = {"json_format": dict(ISTIO_JSON_FIELDS)}
    # `envoy`: no format, so Envoy's default (both data planes write the same line).
    return {"name": "envoy.access_loggers.stderr", "typed_config": config}


def _applies(logging: AccessLogging, direction: str) -> bool:
    mode = logging.match.mode if logging.match is not None else "CLIENT_AND_SERVER"
    return mode in ("CLIENT_AND_SERVER", direction)


def _level_logs(spec: Any, direction: str) -> list[AccessLogging] | None:
    """A Telemetry's accessLogging entries for one direction; None when it says nothing of it."""
    entries = [entry for entry in spec.access_logging or [] if _applies(entry, direction)]
    return entries or None


def access_logs(telemetries: Sequence[Any], namespace: str, labels: Mapping[str, str], direction: str) -> list[Json]:
    """The access_log list for a workload's `direction` listener. As Istio: the workload's own
    Telemetry (selector, in its namespace) over its namespace's (no selector) over the mesh's
    (root namespace, no selector); the most specific level that configures the direction wins
    whole, and `disabled: true` there turns logging off. `telemetries` are oldest first."""
    mesh, namespace_wide, workload = scope_levels(
        telemetries, namespace, labels, lambda telemetry: _level_logs(telemetry.spec, direction)
    )
    chosen = workload or namespace_wide or mesh or []
    logs: list[Json] = []
    for entry in chosen:
        if entry.disabled:
            return []
        # No providers named: Istio's default provider (`envoy`).
        for name in [provider.name for provider in entry.providers or []] or ["envoy"]:
            log = _provider(name)
            if entry.filter is not None:
                op, value = status_filter(entry.filter.expression) or ("GE", 0)
                log["filter"] = {"status_code_filter": {"comparison": {
                    "op": op, "value": {"default_value": value, "runtime_key": "meshctl.access_log.status"}}}}  # fmt: skip
            logs.append(log)
    return logs


def with_access_logs(listeners: list[Json], logs_for: Mapping[str, list[Json]]) -> list[Json]:
    """`listeners` with each connection manager given the access_log of its listener's direction
    (`logs_for`: listener name → logs; the rest get the CLIENT ones). Copies what it changes."""
    changed = []
    for listener in listeners:
        logs = logs_for.get(listener["name"], logs_for.get(CLIENT, []))
        if not logs:
            changed.append(listener)
            continue
        chains = []
        for chain in listener["filter_chains"]:
            filters = []
            for network_filter in chain["filters"]:
                config = network_filter.get("typed_config", {})
                if network_filter.get("name") == "envoy.filters.network.http_connection_manager":
                    network_filter = {**network_filter, "typed_config": {**config, "access_log": logs}}
                filters.append(network_filter)
            chains.append({**chain, "filters": filters})
        changed.append({**listener, "filter_chains": chains})
    return changed
