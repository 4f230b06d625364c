"""Ten client sidecars on one control plane: a 50/50 weight split holds within ±3 points on every
sidecar over 4,000 requests, and a header rule sends every `end-user: jason` request to v3 and
no other request there. Each sidecar's split is read from its own upstream counters
(meshctl_upstream_rq_total per `outbound|9080|SUBSET|reviews...` cluster), with h2load as load."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from helpers.control_plane import start_control_plane
from helpers.mesh import (
    MeshSidecar,
    apply,
    ask_host,
    destination_rule,
    echo_instance,
    print_logs,
    registered,
    stop_all,
    subsets_of,
    virtual_service,
    wait_until,
)
from helpers.ports import free_port

pytestmark = [
    pytest.mark.meshctl_only,
    pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load (nghttp2-client) not installed"),
]

CLIENTS = 10
REQUESTS = 4000
JASON_REQUESTS = 300

def has_route_command(plane) -> bool:
    return plane.meshctl("route", "--help").returncode == 0


def load(port: int, requests: int, *headers: str) -> str:
    """`requests` HTTP/1.1 requests for reviews:9080 through one sidecar; h2load's summary."""
    done = subprocess.run(
        ["h2load", "--h1", "-n", str(requests), "-c", "4", "-H", ":authority: reviews:9080",
         *(item for header in headers for item in ("-H", header)), f"http://127.0.0.1:{port}/"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr + done.stdout
    summary = next(line for line in done.stdout.splitlines() if line.startswith("requests:"))
    status = next(line for line in done.stdout.splitlines() if line.startswith("status codes:"))
    assert f"{requests} succeeded, 0 failed, 0 errored" in summary, done.stdout
    assert f"{requests} 2xx" in status, done.stdout
    return summary


def test_ten_sidecars_split_50_50_and_send_jason_to_v3(tmp_path: Path):
    started = time.monotonic()
    plane = start_control_plane(tmp_path / "plane", "--xds-port", str(free_port()))
    sidecars: list[MeshSidecar] = []
    try:
        for version in ("v1", "v2", "v3"):
            sidecars.append(echo_instance(plane.env, tmp_path, "reviews", version))
        clients = [MeshSidecar(plane.env, tmp_path, "productpage") for _ in range(CLIENTS)]
        sidecars += clients

        def all_ready() -> object:
            ready = sorted(s["version"] for s in registered(plane) if s["service"] == "reviews" and s["ready"])
            return ready == ["v1", "v2", "v3"] or ready

        wait_until(all_ready, 40, "reviews v1, v2, v3 registered and ready")
        apply(plane, destination_rule("v1", "v2", "v3"))
        if has_route_command(plane):
            # The operator's commands: a 50/50 split, and user jason to v3.
            for args in (("--weights", "v1=50,v2=50"), ("--match", "header:end-user=jason", "--to", "v3")):
                done = plane.meshctl("route", "set", "reviews", *args)
                assert done.returncode == 0, done.stderr
            how = "meshctl route set"
        else:
            apply(plane, virtual_service(50, 50, jason="v3"))
            how = "meshctl apply (no `meshctl route` yet)"
        applied = time.monotonic()

        def every_client_routes() -> object:
            seen = {c.outbound_port: ask_host(c.outbound_port, headers={"end-user": "jason"}) for c in clients}
            return set(seen.values()) == {"v3"} or seen

        wait_until(every_client_routes, 30, "every client sidecar has the header rule")
        print(f"rules via {how}; on all {CLIENTS} sidecars {time.monotonic() - applied:.2f}s later")

        splits = {}
        for client in clients:
            before = subsets_of(client.upstream_requests())
            load(client.outbound_port, REQUESTS)
            after = subsets_of(client.upstream_requests())
            split = after - before
            splits[client.outbound_port] = split
            assert sum(split.values()) == REQUESTS, (client.outbound_port, split)
            assert split["v3"] == 0, f"requests without end-user reached v3 on {client.outbound_port}: {split}"
            share = 100 * split["v1"] / REQUESTS
            assert 47 <= share <= 53, f"sidecar {client.outbound_port}: v1 got {share:.1f}% ({split})"

            before = after
            load(client.outbound_port, JASON_REQUESTS, "end-user: jason")
            jason = subsets_of(client.upstream_requests()) - before
            assert jason == Counter(v3=JASON_REQUESTS), f"sidecar {client.outbound_port}: jason went to {jason}"
        for port, split in splits.items():
            print(f"sidecar :{port}  v1 {100 * split['v1'] / REQUESTS:5.2f}%  v2 {100 * split['v2'] / REQUESTS:5.2f}%")
        took = time.monotonic() - started
        print(f"scenario took {took:.1f}s")
        assert took < 120, took
    except BaseException:
        print_logs(sidecars[:4], {"": plane}, sidecar_tail=2000)
        raise
    finally:
        stop_all(sidecars, plane)
