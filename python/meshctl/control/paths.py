"""Where meshctl keeps its state on this machine: the store and the API token, in the data dir."""

from __future__ import annotations

import os
from pathlib import Path

# Chosen for the control plane's REST API: Istio has no such port (it uses the Kubernetes API),
# and 15080 sits in the mesh's 150xx block next to 15012 (xDS) and 15014 (metrics) without
# clashing with any port Istio assigns.
DEFAULT_API_PORT = 15080


def data_dir() -> Path:
    """$XDG_DATA_HOME/meshctl, or ~/.local/share/meshctl (the XDG default)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "meshctl"


def default_store_url() -> str:
    return f"sqlite://{data_dir() / 'store.db'}"


def default_token_path() -> Path:
    return data_dir() / "api-token"


def default_ca_root_path() -> Path:
    """The trust bundle a `meshctl serve` on this machine writes (public; sidecars and the CLI
    verify the control plane's TLS ports with it)."""
    return data_dir() / "ca" / "root-bundle.pem"
