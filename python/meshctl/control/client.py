"""A small blocking client for the control plane's REST API, for one-shot CLI commands (no trio):
plain HTTP with the API token, or (https://) TLS with the token or with an operator's client
certificate instead of it."""

from __future__ import annotations

import datetime
import http.client
import json
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from meshctl.control.auth import TokenError, read_token
from meshctl.control.paths import DEFAULT_API_PORT, default_ca_root_path, default_token_path

ENV_ADDRESS = "MESHCTL_CONTROL_PLANE"
ENV_TOKEN = "MESHCTL_TOKEN"
ENV_CLIENT_CERT = "MESHCTL_CLIENT_CERT"
ENV_CLIENT_KEY = "MESHCTL_CLIENT_KEY"
ENV_CA_ROOT = "MESHCTL_CA_ROOT"
TIMEOUT = 60.0  # an apply of thousands of resources is validated in seconds, not minutes
USAGE = 2  # the exit code of bad input, as click's usage errors


class ClientError(Exception):
    """A refusal or failure, with the exit code the CLI should end with."""

    def __init__(
        self, message: str, exit_code: int = 1, details: list[dict[str, str]] | None = None
    ) -> None:
        super().__init__(message)
        self.message, self.exit_code, self.details = message, exit_code, details or []


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    secure: bool  # https://: TLS on the API port


def resolve_address(address: str | None) -> tuple[str, int]:
    """--control-plane, else $MESHCTL_CONTROL_PLANE, else the local default; HOST, HOST:PORT or [V6]:PORT."""
    endpoint = resolve_endpoint(address)
    return endpoint.host, endpoint.port


def resolve_endpoint(address: str | None) -> Endpoint:
    """As resolve_address, and whether the address asks for TLS (https://HOST:PORT)."""
    text = address or os.environ.get(ENV_ADDRESS) or f"127.0.0.1:{DEFAULT_API_PORT}"
    # Sidecars accept a comma-separated list to fail over between planes; an operator's command
    # talks to the first (any plane serves the same store).
    text = text.split(",")[0].strip()
    secure = text.startswith("https://")
    text = text.removeprefix("https://").removeprefix("http://").rstrip("/")
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
    return Endpoint(host, port, secure)


def resolve_token(token: str | None) -> str:
    """--token, else $MESHCTL_TOKEN, else the token `meshctl serve` wrote to the data dir."""
    token = token or os.environ.get(ENV_TOKEN)
    if token:
        return token
    try:
        return read_token(default_token_path())
    except TokenError as error:
        raise ClientError(str(error)) from None


@dataclass(frozen=True)
class ClientTls:
    """How to reach an https:// control plane: the roots to verify it with, and the client
    certificate to present (an operator's), if any."""

    ca_root: Path
    client_cert: Path | None = None
    client_key: Path | None = None


def resolve_tls(
    endpoint: Endpoint, client_cert: Path | None, client_key: Path | None, ca_root: Path | None
) -> ClientTls | None:
    """The options, else $MESHCTL_CLIENT_CERT, $MESHCTL_CLIENT_KEY, $MESHCTL_CA_ROOT; None for
    an http:// control plane. ClientError (exit 2) when they do not fit together."""
    cert = client_cert or _env_path(ENV_CLIENT_CERT)
    key = client_key or _env_path(ENV_CLIENT_KEY)
    if (cert is None) != (key is None):
        given, missing = (
            ("--client-cert", "--client-key") if key is None else ("--client-key", "--client-cert")
        )
        raise ClientError(
            f"{given} needs {missing} (or ${ENV_CLIENT_KEY if key is None else ENV_CLIENT_CERT})",
            USAGE,
        )
    if not endpoint.secure:
        if cert is not None:
            raise ClientError(
                f"a client certificate ({cert}) is presented over TLS only: give the control plane "
                f"as https://{_host_port(endpoint)} (--control-plane or ${ENV_ADDRESS})",
                USAGE,
            )
        return None
    return ClientTls(ca_root or _env_path(ENV_CA_ROOT) or default_ca_root_path(), cert, key)


def client_tls_context(tls: ClientTls) -> ssl.SSLContext:
    """Verifies the control plane against tls.ca_root (chain and host name) and presents the
    client certificate if there is one. ClientError (exit 2) naming the file that is missing,
    unreadable, expired or does not match."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from meshctl.identity.files import KeyFileError, read_private_key_file

    roots = _read(tls.ca_root, "CA root bundle", f"--ca-root / ${ENV_CA_ROOT}; default: the bundle a "
                                                 "local `meshctl serve` writes")  # fmt: skip
    try:
        context = ssl.create_default_context(cadata=roots.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError) as error:
        raise ClientError(
            f"CA root bundle {tls.ca_root} holds no usable PEM certificate: {error}", USAGE
        ) from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    if tls.client_cert is None or tls.client_key is None:
        return context
    chain = _read(tls.client_cert, "client certificate", f"--client-cert / ${ENV_CLIENT_CERT}")
    try:
        leaf = x509.load_pem_x509_certificate(chain)
    except ValueError:
        raise ClientError(
            f"client certificate {tls.client_cert} is not a PEM certificate", USAGE
        ) from None
    if leaf.not_valid_after_utc <= datetime.datetime.now(datetime.UTC):
        raise ClientError(f"client certificate {tls.client_cert} expired at "
                          f"{leaf.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}; get a new one with "
                          "`meshctl identity operator-cert`", USAGE)  # fmt: skip
    try:
        key_pem = read_private_key_file(tls.client_key)  # refused if others can read it
        key = serialization.load_pem_private_key(key_pem, password=None)
    except KeyFileError as error:
        raise ClientError(
            f"client key (--client-key / ${ENV_CLIENT_KEY}): {error}", USAGE
        ) from None
    except (ValueError, TypeError):
        raise ClientError(
            f"client key {tls.client_key} is not an unencrypted PEM private key", USAGE
        ) from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise ClientError(f"client key {tls.client_key} does not belong to client certificate "
                          f"{tls.client_cert}", USAGE)  # fmt: skip
    try:
        context.load_cert_chain(tls.client_cert, tls.client_key)
    except (ssl.SSLError, OSError) as error:
        raise ClientError(f"cannot use client certificate {tls.client_cert} with key "
                          f"{tls.client_key}: {error}", USAGE) from None  # fmt: skip
    return context


def _read(path: Path, what: str, given_by: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ClientError(f"{what} {path} does not exist ({given_by})", USAGE) from None
    except OSError as error:
        raise ClientError(f"cannot read {what} {path}: {error.strerror or error}", USAGE) from None


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def _host_port(endpoint: Endpoint) -> str:
    host = f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host
    return f"{host}:{endpoint.port}"


class Client:
    def __init__(
        self, address: tuple[str, int], token: str | None, tls: ssl.SSLContext | None = None
    ) -> None:
        """`token` goes in every request's Authorization header (None: a client certificate in
        `tls` authenticates instead); with `tls` the calls go over TLS."""
        self.host, self.port = address
        self.token = token
        self.tls = tls

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
        return self._json(
            "POST",
            "/v1/identity/roots/rotate",
            {} if overlap is None else {"overlapSeconds": overlap},
        )

    def finish_root_rotation(self) -> dict[str, Any]:
        return self._json("POST", "/v1/identity/roots/finish", {})

    def operator_certificate(self, name: str, csr_pem: str, ttl: float) -> dict[str, Any]:
        """The CA signs `csr_pem` for spiffe://TD/ns/meshctl-system/sa/NAME: {"certChain", "roots", ...}."""
        body = {"name": name, "csr": csr_pem, "ttlSeconds": ttl}
        return self._json("POST", "/v1/identity/operator-certificates", body)

    def _json(self, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._call(method, path, json.dumps(body).encode(), "application/json")

    def _call(
        self, method: str, path: str, body: bytes | None = None, content_type: str | None = None
    ) -> dict[str, Any]:
        headers = {"Accept": "application/json"}
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        if content_type:
            headers["Content-Type"] = content_type
        if self.tls is not None:
            connection: http.client.HTTPConnection = http.client.HTTPSConnection(
                self.host, self.port, timeout=TIMEOUT, context=self.tls
            )
        else:
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
        except ssl.SSLCertVerificationError as error:
            raise ClientError(
                f"cannot verify the control plane at {where}: {error.verify_message} (is --ca-root / "
                f"${ENV_CA_ROOT} the mesh's root bundle, and the address a name in its certificate?)"
            ) from None
        except ssl.SSLError as error:
            raise ClientError(f"TLS with the control plane at {where} failed: {error}") from None
        except http.client.RemoteDisconnected as error:
            if self.tls is None or self.token is not None:
                raise ClientError(f"cannot talk to the control plane at {where}: {error}") from None
            # TLS 1.3 checks the client certificate after the client's side of the handshake is
            # done; a refusal then looks like a connection closed before any answer.
            raise ClientError(
                f"TLS with the control plane at {where} failed: it closed the connection without "
                "answering, as it does for a client certificate it cannot verify (not issued by "
                "the mesh's CA, or expired); see `meshctl serve`'s log"
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
