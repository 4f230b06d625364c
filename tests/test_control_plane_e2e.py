"""End to end: `meshctl serve`, two versions of reviews and a productpage client, each under
`meshctl run --service`; `meshctl apply` moves reviews traffic by weight and by header, and an
instance whose sidecar is killed leaves the endpoints within twice its lease."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from helpers.control_plane import ControlPlane, start_control_plane
from helpers.mesh import (
    MeshSidecar,
    apply,
    ask_host,
    echo_instance,
    print_logs,
    registered,
    rules,
    stop_all,
    wait_until,
)
from helpers.ports import free_port

pytestmark = pytest.mark.meshctl_only

SERVERS = Path(__file__).resolve().parent / "servers"
LEASE = 1.5


class Sidecar(MeshSidecar):
    """A MeshSidecar on `plane` with this module's short lease (tests/test_route_cli.py uses it too)."""

    def __init__(self, plane: ControlPlane, directory: Path, service: str, *args: str, command: list[str] = ()) -> None:
        super().__init__(plane.env, directory, service, *args, command=command, lease=LEASE)


def upstream(plane: ControlPlane, directory: Path, version: str) -> MeshSidecar:
    """reviews `version` on `plane`, its app tests/servers/http_echo.py, with this module's short lease."""
    return echo_instance(plane.env, directory, "reviews", version, lease=LEASE)


def ask(port: int, url: str = "http://reviews:9080/", headers: dict[str, str] | None = None) -> str:
    """One request in HTTP proxy mode (absolute-form, as an app under HTTP_PROXY sends it)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": f"http://127.0.0.1:{port}"}))
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with opener.open(request, timeout=3) as response:
            return json.loads(response.read())["name"]
    except urllib.error.HTTPError as error:
        return f"HTTP {error.code}"
    except OSError as error:
        return f"error: {type(error).__name__}"


def names(port: int, count: int, **kwargs) -> Counter:
    return Counter(ask(port, **kwargs) for _ in range(count))


def test_weights_headers_and_leases_through_sidecars(tmp_path: Path):
    deadline = time.monotonic() + 90
    plane = start_control_plane(tmp_path / "plane", "--xds-port", str(free_port()))
    sidecars: list[Sidecar] = []
    try:
        sidecars += [upstream(plane, tmp_path, "v1"), upstream(plane, tmp_path, "v2")]
        client = Sidecar(plane, tmp_path, "productpage")
        sidecars.append(client)

        def both_ready() -> object:
            ready = sorted(s["version"] for s in registered(plane) if s["service"] == "reviews" and s["ready"])
            return ready == ["v1", "v2"] or ready

        wait_until(both_ready, 30, "both reviews instances registered and ready")
        # No VirtualService yet: the service's all-instances cluster gets everything, round robin.
        wait_until(lambda: set(names(client.outbound_port, 6)) == {"v1", "v2"} or names(client.outbound_port, 6),
                   10, "reviews reached through the client sidecar by name")  # fmt: skip
        assert set(names(client.outbound_port, 4, url="http://reviews.default.svc.cluster.local:9080/x")) <= {"v1", "v2"}

        apply(plane, rules(100, 0, jason="v2"))
        wait_until(lambda: names(client.outbound_port, 5) == Counter(v1=5) or names(client.outbound_port, 5), 5, "100/0 → v1")
        assert names(client.outbound_port, 20) == Counter(v1=20)
        assert names(client.outbound_port, 10, headers={"end-user": "jason"}) == Counter(v2=10)

        apply(plane, rules(0, 100, jason="v2"))
        moved = wait_until(lambda: names(client.outbound_port, 5) == Counter(v2=5) or names(client.outbound_port, 5), 5, "0/100 → v2")
        print(f"weight change reached the client sidecar within {moved:.2f}s")
        assert names(client.outbound_port, 20) == Counter(v2=20)

        # Every sidecar's ACK shows in the resource's status.
        def statuses() -> object:
            shown = plane.meshctl("get", "vs", "reviews", "-o", "json")
            sidecars = json.loads(shown.stdout)["status"]["sidecars"] if shown.returncode == 0 else {}
            states = sorted(entry["state"] for entry in sidecars.values())
            return states == ["accepted"] * 3 or (shown.stderr or sidecars)

        wait_until(statuses, 5, "the VirtualService shows three sidecars that accepted it")

        # A config the sidecars refuse: NACKed with the engine's reason, shown by `meshctl get`,
        # and traffic keeps flowing by the last accepted config.
        bad = rules(0, 100, jason="v2") + "    rewrite: {authority: 'not a host'}\n"
        apply(plane, bad)

        def rejected() -> object:
            shown = json.loads(plane.meshctl("get", "vs", "reviews", "-o", "json").stdout)["status"]["sidecars"]
            reasons = [entry.get("reason", "") for entry in shown.values() if entry["state"] == "rejected"]
            return (len(reasons) == 3 and all("not a valid host" in reason for reason in reasons)) or shown

        wait_until(rejected, 5, "three sidecars reject the bad route")
        assert names(client.outbound_port, 10) == Counter(v2=10)

        apply(plane, rules(80, 20, jason="v2"))
        wait_until(lambda: "v1" in names(client.outbound_port, 5), 5, "80/20 takes effect")
        split = names(client.outbound_port, 200)
        assert set(split) == {"v1", "v2"} and 120 <= split["v1"] <= 190, split

        # The v2 sidecar dies without a word (its app goes too): within 2 x lease it is no endpoint.
        apply(plane, rules(0, 100, jason="v2"))
        wait_until(lambda: names(client.outbound_port, 5) == Counter(v2=5) or names(client.outbound_port, 5), 5, "0/100 → v2 again")
        sidecars[1].stop(signal.SIGKILL)  # and the app this test started through that sidecar
        killed = time.monotonic()
        wait_until(lambda: not any(s["version"] == "v2" for s in registered(plane)) or "v2 still registered",
                   2 * LEASE + 1, "the dead instance's lease runs out")  # fmt: skip
        wait_until(lambda: names(client.outbound_port, 3) == Counter({"HTTP 503": 3}) or names(client.outbound_port, 3),
                   3, "the v2 subset is left without endpoints")  # fmt: skip
        gone = time.monotonic() - killed
        assert gone <= 2 * LEASE + 1, gone
        assert names(client.outbound_port, 5, headers={"end-user": "x"}) == Counter({"HTTP 503": 5})
        assert time.monotonic() < deadline, "the scenario took longer than 90s"
    except BaseException:
        print_logs(sidecars, {"": plane}, sidecar_tail=3000, plane_tail=4000)
        raise
    finally:
        stop_all(sidecars, plane)


# An application under `meshctl run --service`: it knows nothing of the mesh, only HTTP_PROXY
# (which urllib honours). It asks reviews by name in a loop and logs who answered.
ASKING_APP = """\
import json, sys, time, urllib.request
with open(sys.argv[1], "a", buffering=1) as log:
    while True:
        try:
            with urllib.request.urlopen("http://reviews:9080/", timeout=3) as response:
                log.write(json.loads(response.read())["name"] + "\\n")
        except Exception as error:
            log.write(f"error {error}\\n")
        time.sleep(0.02)
"""


def answers(path: Path, since: int = 0) -> list[str]:
    lines = path.read_text().splitlines() if path.exists() else []
    return lines[since:]


def test_an_app_reaches_services_by_name_and_survives_a_control_plane_kill(tmp_path: Path):
    api_port, xds_port = free_port(), free_port()
    ports = ("--api-port", str(api_port), "--xds-port", str(xds_port))
    plane = start_control_plane(tmp_path / "plane", *ports)
    sidecars: list[Sidecar] = []
    log = tmp_path / "answers.log"
    try:
        sidecars += [upstream(plane, tmp_path, "v1"), upstream(plane, tmp_path, "v2")]
        apply(plane, rules(100, 0, jason="v2"))
        app = [sys.executable, "-c", ASKING_APP, str(log)]
        sidecars.append(Sidecar(plane, tmp_path, "productpage", command=app))
        wait_until(lambda: answers(log)[-5:] == ["v1"] * 5 or answers(log)[-5:], 20, "the app reaches reviews v1 by name")

        # The control plane dies: no request fails, the sidecars keep their config.
        plane.popen.kill()  # SIGKILL, this PID
        plane.popen.wait()
        killed_at = len(answers(log))
        time.sleep(1.5)
        during = answers(log, killed_at)
        assert len(during) > 10 and set(during) == {"v1"}, Counter(during)

        # It comes back on the same ports and store: the sidecars reconnect, and the next change
        # reaches them with no failed request on the way.
        plane = start_control_plane(tmp_path / "plane", *ports)
        apply(plane, rules(0, 100, jason="v2"))
        mark = len(answers(log))
        moved = wait_until(lambda: answers(log)[-5:] == ["v2"] * 5 or answers(log)[-5:], 15, "after the restart, 0/100 reaches the app's sidecar")
        print(f"after the restart, the change reached the sidecar in {moved:.2f}s")
        after = answers(log, killed_at)
        assert not [line for line in after if line.startswith("error")], Counter(after)
        assert set(answers(log, mark)) <= {"v1", "v2"}
    except BaseException:
        print_logs(sidecars, {"": plane}, sidecar_tail=3000, plane_tail=4000)
        raise
    finally:
        stop_all(sidecars, plane)


def register(plane: ControlPlane, node_id: str, **fields) -> None:
    request = urllib.request.Request(
        f"http://{plane.address}/v1/sidecars/{node_id}",
        data=json.dumps(fields).encode(),
        method="PUT",
        headers={"Authorization": f"Bearer {plane.token_path.read_text().strip()}"},
    )
    with urllib.request.urlopen(request, timeout=5):
        pass


def test_a_real_envoy_follows_meshctl_serve_like_our_sidecar(tmp_path: Path):
    from ads_helpers.running import envoy_ads_bootstrap
    from helpers.dataplane import start_dataplane

    xds_port = free_port()
    plane = start_control_plane(tmp_path / "plane", "--xds-port", str(xds_port))
    sidecars: list[Sidecar] = []
    envoy = None
    try:
        sidecars += [upstream(plane, tmp_path, "v1"), upstream(plane, tmp_path, "v2")]
        client = Sidecar(plane, tmp_path, "productpage")
        sidecars.append(client)
        apply(plane, rules(100, 0, jason="v2"))
        # Envoy joins as a client sidecar: registered by hand (it has no meshctl agent), then
        # bootstrapped with ADS pointing at the control plane.
        envoy_port = free_port()
        register(plane, "envoy-1", service="productpage", outboundPort=envoy_port, leaseSeconds=3600)
        envoy = start_dataplane("envoy", envoy_ads_bootstrap("envoy-1", xds_port, plane.data_dir / "meshctl" / "ca" / "root-bundle.pem", plane.token_path.read_text().strip()), tmp_path, wait_ports=[envoy_port])
        for port in (client.outbound_port, envoy_port):
            wait_until(lambda port=port: Counter(ask_host(port) for _ in range(5)) == Counter(v1=5), 15, f"{port} → v1")

        apply(plane, rules(0, 100, jason="v2"))
        for port in (client.outbound_port, envoy_port):
            wait_until(lambda port=port: Counter(ask_host(port) for _ in range(5)) == Counter(v2=5), 5, f"{port} → v2")
        # The same header rule on both data planes.
        apply(plane, rules(100, 0, jason="v2"))
        for port in (client.outbound_port, envoy_port):
            wait_until(lambda port=port: Counter(ask_host(port) for _ in range(5)) == Counter(v1=5), 5, f"{port} → v1")
            jason = urllib.request.Request(f"http://127.0.0.1:{port}/", headers={"Host": "reviews:9080", "end-user": "jason"})
            with urllib.request.urlopen(jason, timeout=3) as response:
                assert json.loads(response.read())["name"] == "v2"
        shown = json.loads(plane.meshctl("get", "vs", "reviews", "-o", "json").stdout)["status"]["sidecars"]
        wait_until(
            lambda: json.loads(plane.meshctl("get", "vs", "reviews", "-o", "json").stdout)["status"]["sidecars"]
            .get("envoy-1", {}).get("state") == "accepted" or shown,
            5, "Envoy's ACK is recorded",
        )  # fmt: skip
    except BaseException:
        if envoy is not None:
            print(f"--- envoy ---\n{envoy.log()}")
        print_logs(sidecars, {"": plane}, sidecar_tail=3000, plane_tail=4000)
        raise
    finally:
        if envoy is not None:
            envoy.stop()
        stop_all(sidecars, plane)


def test_the_apps_exit_status_is_meshctls_and_the_instance_leaves_at_once(tmp_path: Path):
    plane = start_control_plane(tmp_path / "plane", "--xds-port", "0")
    try:
        app_port = free_port()
        app = (
            "import socket, sys, time\n"
            f"s = socket.create_server(('127.0.0.1', {app_port}))\n"
            "time.sleep(1.5)\n"
            "sys.exit(3)\n"
        )
        sidecar = Sidecar(plane, tmp_path, "ratings", "--app-port", str(app_port), "--inbound-port", str(free_port()),
                          command=[sys.executable, "-c", app])  # fmt: skip
        wait_until(lambda: [s["ready"] for s in registered(plane)] == [True] or registered(plane), 10, "registered, ready")
        assert sidecar.popen.wait(15) == 3, sidecar.log()
        assert registered(plane) == []  # deregistered on the way out, not left to its lease
        assert "ready: app port" in sidecar.log()
    finally:
        plane.stop()


def test_an_app_that_stops_answering_is_not_ready_at_once_and_ready_again_when_it_answers(tmp_path: Path):
    """An app run beside the sidecar (not under it): when it dies the sidecar stays, so only the
    agent's probe can take the instance out of the endpoints before its lease runs out."""
    plane = start_control_plane(tmp_path / "plane", "--xds-port", "0")
    app_port = free_port()
    serving = f"import socket, time\ns = socket.create_server(('127.0.0.1', {app_port}))\ntime.sleep(600)\n"
    app = subprocess.Popen([sys.executable, "-c", serving])
    sidecar = Sidecar(plane, tmp_path, "ratings", "--app-port", str(app_port), "--inbound-port", str(free_port()))
    try:
        wait_until(lambda: [s["ready"] for s in registered(plane)] == [True] or registered(plane), 15, "ready")
        app.kill()  # this PID
        app.wait()
        took = wait_until(lambda: [s["ready"] for s in registered(plane)] == [False] or registered(plane), 5, "not ready")
        print(f"not ready {took:.2f}s after the app died (lease {LEASE}s)")
        assert took < 1.5, took
        wait_until(lambda: "not ready: app port" in sidecar.log(), 2, "the sidecar says why")
        app = subprocess.Popen([sys.executable, "-c", serving])
        wait_until(lambda: [s["ready"] for s in registered(plane)] == [True] or registered(plane), 5, "ready again")
    finally:
        if app.poll() is None:
            app.kill()
            app.wait()
        stop_all([sidecar], plane)


def test_mesh_options_are_checked_before_anything_starts(tmp_path: Path):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "meshctl", "run", *args], check=False, capture_output=True, text=True, timeout=30)

    both = run("--service", "a", "--bootstrap", str(tmp_path / "x.yaml"))
    assert both.returncode == 2 and "exclude each other" in both.stderr
    bad = run("--service", "Reviews_1", "--token", "t")
    assert bad.returncode == 2 and "--service 'Reviews_1' is not a DNS label" in bad.stderr
    clash = run("--service", "a", "--app-port", "15001", "--token", "t")
    assert clash.returncode == 2 and "--outbound-port and --app-port must differ" in clash.stderr


def test_grpc_through_the_mesh_by_service_name(tmp_path: Path):
    import grpc

    plane = start_control_plane(tmp_path / "plane", "--xds-port", "0")
    sidecars: list[Sidecar] = []
    try:
        app_port = free_port()
        sidecars.append(Sidecar(
            plane, tmp_path, "greeter", "--version", "v1", "--app-port", str(app_port), "--service-port", "50051",
            "--app-protocol", "grpc", "--inbound-port", str(free_port()),
            command=[sys.executable, str(SERVERS / "grpc_echo.py"), "--name", "g1", "--port", str(app_port)],
        ))  # fmt: skip
        client = Sidecar(plane, tmp_path, "frontend")
        sidecars.append(client)
        wait_until(lambda: any(s["ready"] for s in registered(plane) if s["service"] == "greeter") or registered(plane),
                   20, "greeter ready")  # fmt: skip
        options = [("grpc.default_authority", "greeter:50051")]
        with grpc.insecure_channel(f"127.0.0.1:{client.outbound_port}", options=options) as channel:
            unary = channel.unary_unary("/meshtest.Echo/Unary")

            def answered() -> object:
                try:
                    return unary(b"hi", timeout=3) == b"g1|hi"
                except grpc.RpcError as error:
                    return f"{error.code()}: {error.details()}"

            wait_until(answered, 10, "a unary call through client sidecar → greeter's sidecar → app")
            bidi = channel.stream_stream("/meshtest.Echo/Bidi")
            replies = list(bidi(iter([b"a", b"b", b"c"]), timeout=5))
            assert len(replies) == 3
    except BaseException:
        print_logs(sidecars, {"": plane}, sidecar_tail=3000)
        raise
    finally:
        stop_all(sidecars, plane)
