"""File-based SDS secrets for a real Envoy that reads the cert dir `meshctl identity agent` keeps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .bootstrap import Json

SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


def file_sds(directory: Path, secret: Json) -> Json:
    """An SDS config that reads `secret` from a file; the secret names the cert dir as its
    watched_directory, so Envoy re-reads its files whenever one is renamed into place."""
    path = directory / f"sds-{secret['name']}.yaml"
    path.write_text(json.dumps({"resources": [{"@type": SECRET_TYPE, **secret}]}))
    return {"name": secret["name"], "sds_config": {"path_config_source": {"path": str(path)},
                                                   "resource_api_version": "V3"}}  # fmt: skip


def cert_dir_secrets(certs: Path, directory: Path) -> tuple[Json, Json]:
    """(`default`, `ROOTCA`) SDS configs over cert.pem/key.pem and root.pem in `certs`, the SDS
    files written to `directory`; Envoy reloads them when the agent renews."""
    watched = {"path": str(certs)}
    default = file_sds(directory, {
        "name": "default",
        "tls_certificate": {
            "certificate_chain": {"filename": str(certs / "cert.pem")},
            "private_key": {"filename": str(certs / "key.pem")},
            "watched_directory": watched,
        },
    })  # fmt: skip
    rootca = file_sds(directory, {
        "name": "ROOTCA",
        "validation_context": {"trusted_ca": {"filename": str(certs / "root.pem")}, "watched_directory": watched},
    })  # fmt: skip
    return default, rootca


def with_file_secrets(value: Any, secrets: dict[str, Json]) -> Any:
    """`value` (compiled xDS) with every SDS reference over ADS to one of `secrets` (`default`,
    ROOTCA) replaced by that file SDS config: what the agent supplies to `meshctl run`, for an
    Envoy that runs compiled config without ADS."""
    if isinstance(value, dict):
        if value.get("sds_config") == {"ads": {}, "resource_api_version": "V3"} and value.get("name") in secrets:
            return secrets[value["name"]]
        return {key: with_file_secrets(item, secrets) for key, item in value.items()}
    if isinstance(value, list):
        return [with_file_secrets(item, secrets) for item in value]
    return value
