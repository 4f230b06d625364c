"""`meshctl run --capture`: iptables REDIRECT in the app's network namespace, end to end.

Two network namespaces the test creates, joined by a veth pair: "mesh" (10.77.0.1) holds the
control plane and reviews v1 behind its sidecar; "app" (10.77.0.2) holds productpage under
`meshctl run --capture`. In "app", `reviews` resolves (/etc/netns/NAME/hosts) to 10.77.0.100,
an address nobody has: only the capture rules and the sidecar's original-destination listeners
can get a request there to reviews. Inbound, a request from "mesh" to 10.77.0.2:9080 reaches the
app, which listens on 127.0.0.1 only, through the sidecar's inbound listener. The rules are gone
after SIGTERM and after the app fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshctl.agent.capture import OUTPUT_CHAIN, PREROUTING_CHAIN, CaptureRules
from meshctl.control import resource_types as types
from meshctl.control.compiler import OUTBOUND_LISTENER, compile_mesh, sidecar_resources, to_messages
from meshctl.control.registry import Sidecar, parse_registration

SERVERS = Path(__file__).parent / "servers"
MESH_IP, APP_IP, NOBODY_IP = "10.77.0.1", "10.77.0.2", "10.77.0.100"
API_PORT, XDS_PORT = 15080, 15010

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("iptables") or not shutil.which("ip"),
    reason="needs root, iptables and iproute2",
)


# --- the config a capturing sidecar gets (no network) ----------------------------------------


def test_a_capturing_sidecar_gets_original_destination_listeners():
    reviews = Sidecar(node_id="r1", service="reviews", version="v1", service_port=9080, app_port=8001,
                      inbound_port=9001, ready=True)  # fmt: skip
    ratings = Sidecar(node_id="t1", service="ratings", service_port=9081, app_port=8002, inbound_port=9002, ready=True)
    plain = Sidecar(node_id="p1", service="productpage", app_port=9080, inbound_port=15006, address=APP_IP)
    captured = Sidecar(**{**plain.__dict__, "node_id": "p2", "capture": True})
    mesh = compile_mesh([], [reviews, ratings, plain, captured])

    assert [l["name"] for l in sidecar_resources(mesh, plain)[types.LISTENER]] == [OUTBOUND_LISTENER, "virtualInbound"]
    listeners = {l["name"]: l for l in sidecar_resources(mesh, captured)[types.LISTENER]}
    assert listeners[OUTBOUND_LISTENER]["use_original_dst"] is True
    assert listeners[OUTBOUND_LISTENER]["address"]["socket_address"]["address"] == "127.0.0.1"
    assert listeners["virtualInbound"]["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 15006}
    # One hand-off listener per mesh service port (productpage:80, reviews:9080, ratings:9081).
    hand_offs = sorted(name for name in listeners if name.startswith("0.0.0.0_"))
    assert hand_offs == ["0.0.0.0_80", "0.0.0.0_9080", "0.0.0.0_9081"]
    for name in hand_offs:
        assert listeners[name]["bind_to_port"] is False
        manager = listeners[name]["filter_chains"][0]["filters"][0]["typed_config"]
        assert manager["rds"]["route_config_name"] == "outbound"


def test_the_engine_accepts_a_capturing_sidecars_listeners():
    from meshctl import _core
    from meshctl.agent.bootstrap import bootstrap_from_dict

    reviews = Sidecar(node_id="r1", service="reviews", service_port=9080, app_port=8001, inbound_port=9001, ready=True)
    captured = Sidecar(node_id="p", service="productpage", app_port=8003, inbound_port=0, outbound_port=0, capture=True)
    compiled = to_messages(sidecar_resources(compile_mesh([], [reviews, captured]), captured))
    engine = _core.Engine(bootstrap_from_dict({}), worker_threads=1)
    try:
        for type_url in (t for t in types.ORDER if t in compiled):  # the compiler makes no secrets
            engine.apply(type_url, [message.SerializeToString() for message in compiled[type_url]])
        assert set(engine.listener_addresses()) >= {OUTBOUND_LISTENER, "virtualInbound"}
    finally:
        engine.stop()


def test_registration_carries_capture():
    assert parse_registration("n", b'{"service": "a", "capture": true}').capture is True
    assert parse_registration("n", b'{"service": "a"}').capture is False
    with pytest.raises(ValueError, match="capture: must be true or false"):
        parse_registration("n", b'{"service": "a", "capture": "yes"}')


def test_rules_exclude_the_sidecars_gid_and_loopback_and_are_removed_exactly():
    rules = CaptureRules(15001, 15006, 9080, sidecar_gid=1337)
    text = [" ".join(command[4:]) for command in rules.commands()]
    assert text == [
        f"-N {OUTPUT_CHAIN}",
        f"-A {OUTPUT_CHAIN} -m owner --gid-owner 1337 -j RETURN",
        f"-A {OUTPUT_CHAIN} -d 127.0.0.0/8 -j RETURN",
        f"-A {OUTPUT_CHAIN} -p tcp -j REDIRECT --to-ports 15001",
        f"-A OUTPUT -p tcp -j {OUTPUT_CHAIN}",
        f"-N {PREROUTING_CHAIN}",
        f"-A {PREROUTING_CHAIN} -p tcp --dport 9080 -j REDIRECT --to-ports 15006",
        f"-A PREROUTING -p tcp -j {PREROUTING_CHAIN}",
    ]
    # A client with no app port: outbound only.
    assert not any(PREROUTING_CHAIN in command for command in CaptureRules(15001, 15006, None).commands())


# --- end to end in network namespaces ---------------------------------------------------------


class Namespace:
    """A network namespace with loopback up; processes started in it are stopped by PID."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.processes: list[subprocess.Popen] = []
        subprocess.run(["ip", "netns", "add", name], check=True)
        self.run(["ip", "link", "set", "lo", "up"])

    def command(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: list[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(argv), check=check, capture_output=True, text=True, timeout=30, **kwargs)

    def start(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        with log.open("wb") as handle:
            # `ip netns exec` execs the command: the PID is the process itself.
            process = subprocess.Popen(self.command(argv), stdout=handle, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, env=env)  # fmt: skip
        self.processes.append(process)
        return process

    def nat_rules(self) -> str:
        return self.run(["iptables", "-w", "-t", "nat", "-S"]).stdout

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()  # this PID only
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        subprocess.run(["ip", "netns", "delete", self.name], check=False)


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last is True:
            return
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout}s (last: {last})")


GET = """\
import json, sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy, whatever the env says
try:
    with opener.open(sys.argv[1], timeout=3) as response:
        print(json.dumps({"name": json.loads(response.read())["name"], "status": response.status}))
except Exception as error:
    print(json.dumps({"error": f"{type(error).__name__}: {error}"}))
"""


def get(namespace: Namespace, url: str) -> dict:
    return json.loads(namespace.run([sys.executable, "-c", GET, url]).stdout)


def counters(namespace: Namespace, admin_port: int = 15000) -> dict[str, int]:
    text = namespace.run(["curl", "-sS", "--max-time", "3", f"http://127.0.0.1:{admin_port}/stats/prometheus"]).stdout
    return {f"{m[1]}{{{m[2]}}}": int(m[3]) for m in re.finditer(r'^(meshctl_\w+)\{(\w+="[^"]*")\} (\d+)$', text, re.MULTILINE)}


@pytest.fixture
def network(tmp_path):
    suffix = f"{os.getpid() % 100000}"
    mesh, app = Namespace(f"mcap-mesh-{suffix}"), Namespace(f"mcap-app-{suffix}")
    hosts_dir = Path(f"/etc/netns/{app.name}")
    try:
        # The veth ends are made inside the namespaces: the host's own network is never touched.
        subprocess.run(["ip", "-n", mesh.name, "link", "add", f"vm{suffix}", "type", "veth",
                        "peer", "name", f"va{suffix}", "netns", app.name], check=True)  # fmt: skip
        for namespace, device, address in ((mesh, f"vm{suffix}", MESH_IP), (app, f"va{suffix}", APP_IP)):
            namespace.run(["ip", "addr", "add", f"{address}/24", "dev", device])
            namespace.run(["ip", "link", "set", device, "up"])
        # `ip netns exec` bind-mounts this over /etc/hosts for processes in the app namespace.
        hosts_dir.mkdir(parents=True, exist_ok=True)
        (hosts_dir / "hosts").write_text(f"127.0.0.1 localhost\n{NOBODY_IP} reviews\n")
        yield mesh, app
    finally:
        app.close()
        mesh.close()
        shutil.rmtree(hosts_dir, ignore_errors=True)
        try:
            hosts_dir.parent.rmdir()  # /etc/netns, if nothing else uses it
        except OSError:
            pass


def meshctl(*args: str) -> list[str]:
    return [sys.executable, "-m", "meshctl", *args]


@needs_root
def test_capture_in_network_namespaces(network, tmp_path):
    mesh, app = network
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "no_proxy", "https_proxy")}
    env["XDG_DATA_HOME"] = str(tmp_path / "data")
    plane = mesh.start(meshctl("serve", "--api-host", MESH_IP, "--api-port", str(API_PORT), "--xds-host", MESH_IP,
                               "--xds-port", str(XDS_PORT), "--store", f"sqlite:///{tmp_path / 'store.db'}"),
                       tmp_path / "serve.log", env)  # fmt: skip
    wait_for(lambda: "ready: API" in (tmp_path / "serve.log").read_text() or plane.poll(), 20, "meshctl serve ready")
    control_plane = ("--control-plane", f"{MESH_IP}:{API_PORT}", "--lease", "2")
    mesh.start(meshctl("run", "--service", "reviews", "--version", "v1", "--app-port", "9080", "--service-port", "9080",
                       "--address", MESH_IP, *control_plane, "--", sys.executable, str(SERVERS / "http_echo.py"),
                       "--name", "v1", "--port", "9080"), tmp_path / "reviews.log", env)  # fmt: skip

    def start_productpage(log: Path, *command: str) -> subprocess.Popen:
        return app.start(meshctl("run", "--capture", "--service", "productpage", "--app-port", "9080",
                                 "--service-port", "9080", "--address", APP_IP, *control_plane, "--", *command),
                         log, env)  # fmt: skip

    log = tmp_path / "productpage.log"
    sidecar = start_productpage(log, sys.executable, str(SERVERS / "http_echo.py"), "--name", "productpage", "--port", "9080")
    try:
        wait_for(lambda: "ready: app port" in (tmp_path / "reviews.log").read_text() or sidecar.poll(), 30, "reviews ready")
        wait_for(lambda: "ready: app port" in log.read_text() or sidecar.poll(), 30, "productpage ready")
        rules = app.nat_rules()
        assert f"-A OUTPUT -p tcp -j {OUTPUT_CHAIN}" in rules and f"-A PREROUTING -p tcp -j {PREROUTING_CHAIN}" in rules
        assert "--gid-owner 1337 -j RETURN" in rules, rules

        # Outbound: `reviews` is an address nobody has; captured, it reaches reviews v1 by name.
        wait_for(lambda: get(app, "http://reviews:9080/") == {"name": "v1", "status": 200} or get(app, "http://reviews:9080/"),
                 15, "http://reviews:9080/ from the app namespace, no proxy settings")  # fmt: skip
        before = counters(app)
        for _ in range(5):
            assert get(app, "http://reviews:9080/x")["name"] == "v1"
        after = counters(app)
        handed = 'meshctl_downstream_cx_total{listener="0.0.0.0_9080"}'
        upstream = 'meshctl_upstream_rq_total{cluster="outbound|9080||reviews.default.svc.cluster.local"}'
        assert after.get(handed, 0) - before.get(handed, 0) == 5, (before, after)  # SO_ORIGINAL_DST hand-off
        assert after[upstream] - before.get(upstream, 0) == 5

        # Inbound: the app listens on 127.0.0.1:9080 only; from the other namespace,
        # 10.77.0.2:9080 reaches it through the sidecar's inbound listener.
        inbound = 'meshctl_upstream_rq_total{cluster="inbound|9080||"}'
        before = counters(app).get(inbound, 0)
        assert get(mesh, f"http://{APP_IP}:9080/in") == {"name": "productpage", "status": 200}
        assert counters(app)[inbound] - before == 1

        # SIGTERM: meshctl stops the app, drains, and takes its rules out.
        sidecar.send_signal(signal.SIGTERM)  # this PID
        sidecar.wait(20)
        rules = app.nat_rules()
        assert "MESHCTL" not in rules, rules
        assert get(mesh, f"http://{APP_IP}:9080/in").get("error"), "nothing answers once capture is gone"

        # The app fails: meshctl exits with its status, and the rules are gone too (they were
        # there while it ran: the app saw them).
        seen = tmp_path / "rules-seen-by-app.txt"
        failing = start_productpage(tmp_path / "failing.log", "sh", "-c", f"sleep 1; iptables -w -t nat -S > {seen}; exit 3")
        assert failing.wait(30) == 3, (tmp_path / "failing.log").read_text()
        assert OUTPUT_CHAIN in seen.read_text()
        assert "MESHCTL" not in app.nat_rules()
    except BaseException:
        for name in ("serve.log", "reviews.log", "productpage.log", "failing.log"):
            path = tmp_path / name
            if path.exists():
                print(f"--- {name} ---\n{path.read_text(errors='replace')[-3000:]}")
        print(app.nat_rules())
        raise


@needs_root
def test_a_second_capture_in_the_same_namespace_is_refused(network, tmp_path):
    _, app = network
    app.run(["iptables", "-w", "-t", "nat", "-N", OUTPUT_CHAIN])  # left behind by a killed run
    done = app.run(meshctl("run", "--capture", "--service", "a", "--token", "t", "--control-plane", "127.0.0.1:1"),
                   check=False)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert f"iptables chain {OUTPUT_CHAIN} (nat) exists already" in done.stderr
    assert app.run(["iptables", "-w", "-t", "nat", "-S", OUTPUT_CHAIN]).returncode == 0  # not ours: left alone


def test_capture_needs_a_mesh_sidecar(tmp_path):
    done = subprocess.run(meshctl("run", "--capture", "--bootstrap", str(tmp_path / "x.yaml")),
                          capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
    assert done.returncode == 2 and "--capture needs --service" in done.stderr
