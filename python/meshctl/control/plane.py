"""Run the control plane: open the store, make sure there is an API token, serve the API.

This is the seam for the xDS server: `run_control_plane` takes extra services, each started in
the same nursery with the open store, so the ADS server (meshctl/control/ads.py) subscribes to
`store.watch()` and writes ACK/NACK results with `store.set_status()`.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from meshctl.control.api import Limits, serve_api
from meshctl.control.api_tls import ApiTls, operator_pattern
from meshctl.control.auth import ensure_token
from meshctl.control.registry import Registry
from meshctl.control.registry_api import RegistryApi
from meshctl.control.store import Store
from meshctl.control.store_sqlite import SqliteStore, parse_store_url

# A service runs until cancelled and calls task_status.started(description) once it serves;
# the description (e.g. "xDS on 127.0.0.1:15012") goes into the ready line.
Service = Callable[..., Awaitable[None]]


@dataclass(frozen=True)
class PlaneOptions:
    store_url: str
    api_host: str
    api_port: int
    token_path: Path
    limits: Limits = field(default_factory=Limits)


def open_store(url: str) -> Store:
    """The store a --store URL names: a SQLite file, or an etcd cluster shared for HA."""
    if url.startswith("etcd://"):
        from meshctl.control.store_etcd import EtcdStore  # only HA setups pay for its imports

        return EtcdStore.from_url(url)
    return SqliteStore.open(parse_store_url(url))


async def run_control_plane(
    options: PlaneOptions,
    services: Sequence[Callable[[Store], Service]] = (),
    on_ready: Callable[[list[str]], Any] = lambda lines: None,
    registry: Registry | None = None,
    api_extensions: Sequence[Any] = (),
    api_tls: ApiTls | None = None,
) -> None:
    """Serve until cancelled. `services` are factories taking the open store. The service
    registry's endpoints join the API; pass `registry` to share it with a service (xDS).
    `api_extensions` are further endpoint groups (see api_handlers.Api); with `api_tls` the API
    port also speaks TLS (operator client certificates)."""
    token = ensure_token(options.token_path)
    registry = registry or Registry()
    store = open_store(options.store_url)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.serve)  # etcd: connected and watching before the API opens
            if hasattr(store, "follow_registrations"):
                # Several planes on one etcd: every plane knows every plane's instances.
                await nursery.start(registry.share, store)
            else:
                # One plane: it knows its instances again before it pushes anything.
                await nursery.start(registry.restore, store)
            await nursery.start(registry.serve)  # expires leases
            host, port = await nursery.start(
                functools.partial(serve_api, extensions=[RegistryApi(registry), *api_extensions],
                                  tls=api_tls),
                store, token, options.api_host, options.api_port, options.limits,
            )  # fmt: skip
            ready = [f"API on http://{_host(host)}:{port} (token in {options.token_path})"]
            if api_tls is not None:
                ready[0] += (f", also https://{_host(host)}:{port} with operator client "
                             f"certificates ({operator_pattern(api_tls.authority.ca.trust_domain)})")  # fmt: skip
            for factory in services:
                ready.append(str(await nursery.start(factory(store))))
            ready.append(f"store {options.store_url} at revision {store.revision}")
            on_ready(ready)
    finally:
        with trio.CancelScope(shield=True):
            await store.aclose()


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
