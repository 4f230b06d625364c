"""Reading the registered sidecars' /stats/prometheus from this machine: samples, concurrently.

Admin endpoints listen on loopback only, so a sidecar registered on another host (or with no
admin port) is not read; it is named with the reason, as is one whose admin did not answer.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

SCRAPE_TIMEOUT = 2.0

_METRIC_LINE = re.compile(r"^(\w+)\{(.*)\}\s+(\S+)\s*$")
_METRIC_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

Parsed = TypeVar("Parsed")


def samples(text: str) -> Iterator[tuple[str, dict[str, str], float]]:
    """(metric, labels, value) of every labelled sample in a Prometheus text exposition."""
    for line in text.splitlines():
        found = _METRIC_LINE.match(line)
        if not found:
            continue
        try:
            value = float(found.group(3))
        except ValueError:
            continue
        labels = {
            k: v.replace('\\"', '"').replace("\\\\", "\\")
            for k, v in _METRIC_LABEL.findall(found.group(2))
        }
        yield found.group(1), labels, value


@dataclass
class SidecarReads(Generic[Parsed]):
    """One read of every reachable sidecar: {node id: what `parse` made of its text}."""

    at: float  # time.monotonic() halfway through the reads
    by_node: dict[str, Parsed] = field(default_factory=dict)
    unreachable: dict[str, str] = field(default_factory=dict)  # node id → why


def _local_addresses() -> set[str]:
    import socket

    addresses = {"localhost"}
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None):
            addresses.add(str(info[4][0]))
    except OSError:
        pass
    return addresses


def _is_local(address: str, local: set[str]) -> bool:
    import ipaddress

    try:
        if ipaddress.ip_address(address).is_loopback:
            return True
    except ValueError:
        pass
    return address in local


def read_admin(port: int) -> str:
    """The text of 127.0.0.1:`port`/stats/prometheus; OSError or HTTPException if unreadable."""
    import http.client

    # http.client, not urllib: an HTTP_PROXY in the environment must not catch loopback reads.
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=SCRAPE_TIMEOUT)
    try:
        connection.request("GET", "/stats/prometheus")
        response = connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise OSError(f"admin answered {response.status}")
        return body.decode("utf-8", "replace")
    finally:
        connection.close()


def read_sidecars(
    sidecars: Iterable[Mapping[str, Any]], parse: Callable[[str], Parsed]
) -> SidecarReads[Parsed]:
    """Read every registered sidecar this machine can reach, concurrently, through `parse`."""
    import http.client
    from concurrent.futures import ThreadPoolExecutor

    result: SidecarReads[Parsed] = SidecarReads(at=time.monotonic())
    local = _local_addresses()
    targets = []
    for sidecar in sidecars:
        node, port = sidecar["nodeId"], sidecar.get("adminPort")
        if not port:
            result.unreachable[node] = "registered no admin port"
        elif not _is_local(sidecar.get("address", ""), local):
            result.unreachable[node] = (
                f"on another host ({sidecar['address']}); admin is loopback-only"
            )
        else:
            targets.append((node, port))

    def read(target: tuple[str, int]) -> tuple[str, Parsed | None, str]:
        node, port = target
        try:
            return node, parse(read_admin(port)), ""
        except (OSError, http.client.HTTPException) as error:
            return node, None, f"admin 127.0.0.1:{port}: {error}"

    if targets:
        with ThreadPoolExecutor(max_workers=min(16, len(targets))) as pool:
            for node, parsed, why in pool.map(read, targets):
                if why:
                    result.unreachable[node] = why
                else:
                    result.by_node[node] = parsed  # type: ignore[assignment]  # read, so parsed
    result.at = (result.at + time.monotonic()) / 2
    return result
