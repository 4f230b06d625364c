"""A small blocking client for the control plane's REST API, for one-shot CLI commands (no trio)."""

from __future__ import annotations

import http.client
import json
import os
from typing import Any
from urllib.parse import quote, urlencode

from meshctl.control.auth import TokenError, read_token
from meshctl.control.paths import DEFAULT_API_PORT, default_token_path

ENV_ADDRESS = "MESHCTL_CONTROL_PLANE"
ENV_TOKEN = "MESHCTL_TOKEN"
TIMEOUT = 60.0  # an apply of thousands of resources is validated in seconds, not minutes


class ClientError(Exception):
    """A refusal or failure, with the exit code the CLI should end with."""

    def __init__(
        self, message: str, exit_code: int = 1, details: list[dict[str, str]] | None = None
    ) -> None:
        super().__init__(message)
        self.message, self.exit_code, self.details = message, exit_code, details or []


def resolve_address(address: str | None) -> tuple[str, int]:
    """--control-plane, else $MESHCTL_CONTROL_PLANE, else the local default; HOST, HOST:PORT or [V6]:PORT."""
    text = address or os.environ.get(ENV_ADDRESS) or f"127.0.0.1:{DEFAULT_API_PORT}"
    # Sidecars accept a comma-separated list to fail over between planes; an operator's command
    # talks to the first (any plane serves the same store).
    text = text.split(",")[0].strip()
    text = text.removeprefix("http://").rstrip("/")
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":")
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    try:
        port = int(port_text) if port_text else DEFAULT_API_PORT
    except ValueError:
        raise ClientError(f"control plane address {text!r} is not HOST:PORT") from None
    return host, port


def resolve_token(token: str | None) -> str:
    """--token, else $MESHCTL_TOKEN, else the token `meshctl serve` wrote to the data dir."""
    token = token or os.environ.get(ENV_TOKEN)
    if token:
        return token
    try:
        return read_token(default_token_path())
    except TokenError as error:
        raise ClientError(str(error)) from None


class Client:
    def __init__(self, address: tuple[str, int], token: str) -> None:
        self.host, self.port = address
        self.token = token

    def apply(self, text: bytes, dry_run: bool = False) -> dict[str, Any]:
        query = "?dryRun=true" if dry_run else ""
        return self._call("POST", f"/v1/apply{query}", text, "application/yaml")

    def list(self, kind: str, namespace: str | None) -> dict[str, Any]:
        query = f"?{urlencode({'namespace': namespace})}" if namespace else ""
        return self._call("GET", f"/v1/resources/{quote(kind)}{query}")

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        return self._call("GET", _resource_path(kind, namespace, name))

    def delete(
        self, kind: str, namespace: str, name: str, version: int | None = None
    ) -> dict[str, Any]:
        query = f"?version={version}" if version is not None else ""
        return self._call("DELETE", _resource_path(kind, namespace, name) + query)

    def sidecars(self) -> dict[str, Any]:
        """The service registry: every live sidecar registration, and where xDS is served."""
        return self._call("GET", "/v1/sidecars")

    # --- workload identity (meshctl identity ...) --------------------------------------------

    def create_join_token(self, service_account: str, namespace: str, ttl: float) -> dict[str, Any]:
        body = {"serviceAccount": service_account, "namespace": namespace, "ttlSeconds": ttl}
        return self._json("POST", "/v1/identity/tokens", body)

    def join_tokens(self) -> dict[str, Any]:
        return self._call("GET", "/v1/identity/tokens")

    def revoke_join_token(self, token_id: str) -> dict[str, Any]:
        return self._call("DELETE", f"/v1/identity/tokens/{quote(token_id, safe='')}")

    def certificates(self) -> dict[str, Any]:
        return self._call("GET", "/v1/identity/certificates")

    def revoke_certificates(self, body: dict[str, Any]) -> dict[str, Any]:
        """{"serial": HEX} or {"serviceAccount": SA, "namespace": NS}."""
        return self._json("POST", "/v1/identity/revocations", body)

    def roots(self) -> dict[str, Any]:
        return self._call("GET", "/v1/identity/roots")

    def rotate_root(self, overlap: float | None) -> dict[str, Any]:
        return self._json("POST", "/v1/identity/roots/rotate", {} if overlap is None else {"overlapSeconds": overlap})

    def finish_root_rotation(self) -> dict[str, Any]:
        return self._json("POST", "/v1/identity/roots/finish", {})

    def _json(self, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._call(method, path, json.dumps(body).encode(), "application/json")

    def _call(
        self, method: str, path: str, body: bytes | None = None, content_type: str | None = None
    ) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        connection = http.client.HTTPConnection(self.host, self.port, timeout=TIMEOUT)
        where = f"{self.host}:{self.port}"
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            raw = response.read()
        except ConnectionRefusedError:
            raise ClientError(
                f"cannot reach the control plane at {where}: connection refused (is `meshctl serve` "
                f"running? set --control-plane or ${ENV_ADDRESS})"
            ) from None
        except (OSError, http.client.HTTPException) as error:
            raise ClientError(f"cannot talk to the control plane at {where}: {error}") from None
        finally:
            connection.close()
        try:
            answer = json.loads(raw)
        except ValueError:
            raise ClientError(
                f"the control plane at {where} answered {response.status} with no JSON body"
            ) from None
        if response.status >= 400:
            error = answer.get("error", {}) if isinstance(answer, dict) else {}
            raise ClientError(
                error.get("message", f"HTTP {response.status}"),
                error.get("exit_code", 1),
                error.get("details"),
            )
        return answer


def _resource_path(kind: str, namespace: str, name: str) -> str:
    return f"/v1/resources/{quote(kind)}/{quote(namespace, safe='')}/{quote(name, safe='')}"
