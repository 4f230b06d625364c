"""Run the ADS server (killable, restartable), an in-process engine with the agent, and Envoy on ADS."""

from __future__ import annotations

import functools
import time
from collections import Counter
from pathlib import Path

import trio
from helpers import bootstrap as b
from helpers.dataplane import start_dataplane
from helpers.http_client import Http1Client
from helpers.ports import free_port
from helpers.procs import Process

from meshctl.control.ads import AdsServer, serve_ads
from meshctl.control.snapshot import SnapshotCache


class RunningServer:
    """serve_ads in its own cancel scope: `kill()` drops every connection at once, as a crash would."""

    def __init__(self, cache: SnapshotCache) -> None:
        self.cache = cache
        self.server = AdsServer(cache)
        self.scope = trio.CancelScope()
        self.address: tuple[str, int] = ("", 0)

    async def start(self, nursery: trio.Nursery, port: int = 0) -> RunningServer:
        async def run(task_status: trio.TaskStatus) -> None:
            with self.scope:
                await serve_ads(("127.0.0.1", port), self.cache, server=self.server, task_status=task_status)

        self.address = await nursery.start(run)
        return self

    def kill(self) -> None:
        self.scope.cancel()


def envoy_ads_bootstrap(
    node_id: str, ads_port: int, ca_file: Path | None = None, api_token: str | None = None
) -> dict:
    """Envoy with everything from ADS: listeners and clusters (and through them routes, endpoints).
    With `ca_file` (a `meshctl serve` trust bundle), ADS goes over TLS, the server verified; with
    `api_token`, Envoy authenticates with it (a `meshctl serve` TLS port asks for it, or a client
    certificate)."""
    grpc_service: dict = {"envoy_grpc": {"cluster_name": "xds"}}
    if api_token is not None:
        grpc_service["initial_metadata"] = [{"key": "authorization", "value": f"Bearer {api_token}"}]
    xds = b.cluster("xds", ads_port, http2=True)
    if ca_file is not None:
        xds["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": "localhost",
                "common_tls_context": {
                    "alpn_protocols": ["h2"],
                    "validation_context": {
                        "trusted_ca": {"filename": str(ca_file)},
                        "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": "localhost"}}],
                    },
                },
            },
        }
    return {
        "node": {"id": node_id, "cluster": "ads-test"},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [grpc_service],
            },
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {"clusters": [xds]},
        "admin": {"address": b.socket_address(free_port())},
    }


async def start_envoy(node_id: str, ads_port: int, listener_port: int, directory: Path) -> Process:
    """Start Envoy and wait (off the trio thread, so the ADS server keeps answering) until the
    listener it gets over ADS accepts connections."""
    config = envoy_ads_bootstrap(node_id, ads_port)
    return await trio.to_thread.run_sync(
        lambda: start_dataplane("envoy", config, directory, wait_ports=[listener_port], timeout=30)
    )


def _names(port: int, count: int) -> Counter:
    seen: Counter = Counter()
    for index in range(count):
        client = Http1Client(port, timeout=2)
        try:
            response = client.get(f"/probe/{index}")
            seen[response.json()["name"] if response.status == 200 else f"HTTP {response.status}"] += 1
        except (OSError, ValueError) as error:
            seen[f"error: {type(error).__name__}"] += 1
        finally:
            client.close()
    return seen


async def upstream_names(port: int, count: int = 10) -> Counter:
    """Which upstream answered each of `count` requests through the data plane on `port`."""
    return await trio.to_thread.run_sync(_names, port, count)


async def wait_for_upstream(port: int, name: str, timeout: float) -> float:
    """Wait until every request through `port` reaches `name`; the seconds it took."""
    started = time.monotonic()
    seen: Counter = Counter()
    with trio.move_on_after(timeout):
        while True:
            seen = await upstream_names(port, 5)
            if set(seen) == {name}:
                return time.monotonic() - started
            await trio.sleep(0.05)
    raise AssertionError(f"port {port} did not route everything to {name!r} within {timeout}s; last saw {dict(seen)}")


def bounded(seconds: float):
    """Fail an async test that runs longer than `seconds` (a hung stream must not hang the suite)."""

    def decorate(test):
        @functools.wraps(test)
        async def run(*args, **kwargs):
            with trio.fail_after(seconds):
                await test(*args, **kwargs)

        return run

    return decorate
