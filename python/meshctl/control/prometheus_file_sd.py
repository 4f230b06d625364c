"""`meshctl serve --prometheus-file-sd PATH`: keep a Prometheus file_sd file listing every registered
sidecar's metrics endpoint current as instances register, expire and deregister.

Written whole and renamed into place, so Prometheus (which watches the file) never reads half of
it; rewritten only when the targets change (a lease renewal changes nothing here).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import trio

from meshctl.control.prometheus_targets import file_sd_groups
from meshctl.control.registry import Registry

log = logging.getLogger("meshctl.control.prometheus_file_sd")


def file_sd_text(groups: list[dict[str, Any]]) -> str:
    return json.dumps(groups, indent=2) + "\n"


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text` in one rename (a temporary file in the same directory).
    OSError if the directory cannot take it."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
        os.chmod(temporary, 0o644)  # Prometheus often runs as another user; mkstemp makes it 0600
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def check_writable(path: Path) -> None:
    """Fail at start, before serving, if `path` cannot be kept: OSError naming the problem. Tries
    what keeping it does (a temporary file beside it), without touching the file itself."""
    if path.is_dir():
        raise IsADirectoryError(21, "Is a directory", str(path))
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    os.unlink(temporary)


async def keep_file_sd(
    registry: Registry, path: Path, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
) -> None:
    """Write the registry's targets to `path` now and after every change, until cancelled. A failed
    write is logged and retried at the next change or in a few seconds, whichever comes first."""
    written: str | None = None
    started = False
    while True:
        # Read before the targets: a change during the write below is then not missed.
        generation = registry.generation
        text = file_sd_text(file_sd_groups(sidecar.as_json() for sidecar in registry.sidecars()))
        if text != written:
            try:
                await trio.to_thread.run_sync(write_atomically, path, text)
                written = text
            except OSError as error:
                log.warning(
                    "cannot write --prometheus-file-sd %s: %s; retrying",
                    path,
                    error.strerror or error,
                )
        if not started:
            task_status.started(f"Prometheus file_sd targets in {path}")
            started = True
        with trio.move_on_after(5.0 if written != text else float("inf")):
            await registry.wait_for_change(generation)


def file_sd_service(registry: Registry, path: Path) -> Callable[[Any], Any]:
    """A run_control_plane service factory (the store is not needed): keep_file_sd on `path`."""
    return lambda store: partial(keep_file_sd, registry, path)
