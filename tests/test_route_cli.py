"""`meshctl route set/show/shift` against a real `meshctl serve`: the resources it writes, traffic
through a client sidecar following them, the live split read from the sidecars' counters, and a
canary that completes on a healthy version and rolls itself back on a failing one."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.control_plane import ControlPlane, start_control_plane
from helpers.ports import free_port
from test_control_plane_e2e import Sidecar, registered, wait_until

from meshctl.cli.route import (
    RouteInputError,
    Routing,
    Scrape,
    VersionCount,
    parse_duration,
    parse_match,
    parse_prometheus,
    parse_rate,
    parse_weights,
    plan,
    split_between,
)

pytestmark = pytest.mark.meshctl_only

# --- the option parsers and the documents they lead to (no processes) ---------------------


def test_weights_parse_and_refuse_with_reasons():
    assert parse_weights("v1=90,v2=10") == {"v1": 90, "v2": 10}
    assert parse_weights(" v1 = 100 ") == {"v1": 100}
    for text, reason in [
        ("v1=90,v2=20", "sum to 110, not 100"),
        ("v1:90,v2=10", "is not VERSION=PERCENT"),
        ("v1=90,v1=10", "given twice"),
        ("v1=ninety", "whole percent"),
        ("V1=100", "not a DNS label"),
        ("v1=101,v2=-1", "not in 0-100"),
        ("", "is not VERSION=PERCENT"),
    ]:
        with pytest.raises(RouteInputError, match=reason):
            parse_weights(text)


def test_matches_durations_and_rates():
    assert parse_match("header:end-user=jason") == {"headers": {"end-user": {"exact": "jason"}}}
    assert parse_match("header:x-canary^=yes") == {"headers": {"x-canary": {"prefix": "yes"}}}
    assert parse_match("header:user~=j.*") == {"headers": {"user": {"regex": "j.*"}}}
    assert parse_match("uri:/api") == {"uri": {"prefix": "/api"}}
    for bad in ("end-user=jason", "header:=x", "header:end-user=", "cookie:a=b"):
        with pytest.raises(RouteInputError):
            parse_match(bad)
    assert parse_duration("30s", "--interval") == 30
    assert parse_duration("500ms", "--interval") == 0.5
    assert parse_duration("2m", "--interval") == 120
    with pytest.raises(RouteInputError):
        parse_duration("0s", "--interval")
    with pytest.raises(RouteInputError):
        parse_duration("soon", "--interval")
    assert parse_rate("1%", "--max-error-rate") == pytest.approx(0.01)
    assert parse_rate("0.5", "--max-error-rate") == pytest.approx(0.005)
    with pytest.raises(RouteInputError):
        parse_rate("150%", "--max-error-rate")


def test_a_header_rule_goes_ahead_of_the_default_and_keeps_its_weights():
    first = plan(Routing("reviews", "default"), {"v1": 90, "v2": 10})
    routing = Routing("reviews", "default", first[1], first[0])
    rule, virtual = plan(routing, match=parse_match("header:end-user=jason"), to="v3")
    assert [s["name"] for s in rule["spec"]["subsets"]] == ["v1", "v2", "v3"]
    routes = virtual["spec"]["http"]
    assert routes[0]["match"] == [{"headers": {"end-user": {"exact": "jason"}}}]
    assert routes[0]["route"] == [{"destination": {"host": "reviews", "subset": "v3"}}]
    assert Routing("reviews", "default", virtual, rule).default_weights() == {"v1": 90, "v2": 10}
    # The same match again updates the rule instead of adding a second one.
    again = plan(
        Routing("reviews", "default", virtual, rule),
        match=parse_match("header:end-user=jason"),
        to="v1",
    )
    assert len(again[1]["spec"]["http"]) == 2


def test_counters_are_read_per_outbound_cluster():
    text = (
        "# TYPE meshctl_upstream_rq_total counter\n"
        'meshctl_upstream_rq_total{cluster="outbound|9080|v1|reviews.default.svc.cluster.local"} 7\n'
        'meshctl_upstream_rq_total{cluster="inbound|9080||reviews.default.svc.cluster.local"} 9\n'
        'meshctl_upstream_rs_total{cluster="outbound|9080|v1|reviews.default.svc.cluster.local",code_class="2xx"} 5\n'
        'meshctl_upstream_rs_total{cluster="outbound|9080|v1|reviews.default.svc.cluster.local",code_class="5xx"} 2\n'
    )
    counts = parse_prometheus(text)
    assert list(counts) == ["outbound|9080|v1|reviews.default.svc.cluster.local"]
    only = counts["outbound|9080|v1|reviews.default.svc.cluster.local"]
    assert (only.requests, only.errors) == (7, 2)


REVIEWS_V3 = "outbound|9080|v3|reviews.default.svc.cluster.local"


def _resilience_text(scale: int, fallbacks: int) -> str:
    """A sidecar's counters for reviews v3: each figure `scale` times a base."""
    c = f'cluster="{REVIEWS_V3}"'
    return "\n".join([
        f"meshctl_upstream_rq_total{{{c}}} {13 * scale}",
        f'meshctl_upstream_rs_total{{{c},code_class="2xx"}} {9 * scale}',
        f'meshctl_upstream_rs_total{{{c},code_class="5xx"}} {1 * scale}',
        f"meshctl_upstream_rq_retry_total{{{c}}} {3 * scale}",
        f"meshctl_upstream_rq_retry_success_total{{{c}}} {2 * scale}",
        f"meshctl_upstream_rq_pending_overflow_total{{{c}}} {1 * scale}",
        f"meshctl_upstream_cx_overflow_total{{{c}}} {1 * scale}",
        f"meshctl_outlier_detection_ejections_active{{{c}}} 1",
        f"meshctl_upstream_rq_fallback_total{{{c}}} {fallbacks}",
        # The same fallbacks by host and reason: not counted twice.
        f'meshctl_fallback_total{{host="reviews.default.svc.cluster.local",reason="5xx"}} {fallbacks}',
    ])  # fmt: skip


def test_resilience_figures_are_per_request_and_fallbacks_count_against_the_new_version():
    counts = parse_prometheus(_resilience_text(1, 0))
    v3 = counts[REVIEWS_V3]
    # Requests are answers (9 + 1), not tries (13: the 3 retries are tries too).
    assert (v3.requests, v3.errors, v3.tries) == (10, 1, 13)
    assert (v3.retries, v3.retry_successes, v3.overflows, v3.ejected) == (3, 2, 2, 1)
    before = Scrape(at=0, counters={"n1": counts, "n2": parse_prometheus(_resilience_text(1, 0))})
    after = Scrape(at=2, counters={"n1": parse_prometheus(_resilience_text(3, 4)),
                                   "n2": parse_prometheus(_resilience_text(2, 1))})  # fmt: skip
    split = split_between(before, after, "reviews.default.svc.cluster.local")
    grown = split["v3"]
    assert (grown.requests, grown.errors, grown.retries, grown.retry_successes) == (30, 3, 9, 6)
    assert grown.ejected == 1  # each caller's view of the same endpoint: not summed
    # The Fallback's answers for v3 are failures of v3 (3 + 5 fallbacks).
    assert grown.fallbacks == 5 and set(split) == {"v3"}
    assert (grown.answered, grown.failures) == (30, 8)
    # Fallbacks for requests that never reached the cluster keep the rate at most 100%.
    lone = VersionCount(requests=2, fallbacks=5)
    assert (lone.failures, lone.answered) == (5, 5)
    # A counter that went down is a restarted sidecar: all of it is new.
    restarted = Scrape(at=4, counters={"n1": parse_prometheus(_resilience_text(1, 0))})
    assert split_between(after, restarted, "reviews.default.svc.cluster.local")["v3"].requests == 10


def test_a_registration_carries_the_admin_port():
    from meshctl.control.registry import RegistrationError, parse_registration

    sidecar = parse_registration("n1", b'{"service": "reviews", "adminPort": 15100}')
    assert sidecar.admin_port == 15100 and sidecar.as_json()["adminPort"] == 15100
    assert parse_registration("n1", b'{"service": "reviews"}').admin_port is None
    with pytest.raises(RegistrationError, match="adminPort"):
        parse_registration("n1", b'{"service": "reviews", "adminPort": 0}')


# --- against a control plane with no sidecars ----------------------------------------------


def test_route_set_writes_both_resources_and_refuses_bad_input(tmp_path: Path):
    plane = start_control_plane(tmp_path / "plane", "--xds-port", "0")
    try:
        done = plane.meshctl("route", "set", "reviews", "--weights", "v1=90,v2=10")
        assert done.returncode == 0, done.stderr
        assert "default" in done.stdout and "v1=90 v2=10" in done.stdout
        rule = json.loads(plane.meshctl("get", "dr", "reviews", "-o", "json").stdout)
        assert rule["spec"]["subsets"] == [
            {"name": "v1", "labels": {"version": "v1"}},
            {"name": "v2", "labels": {"version": "v2"}},
        ]
        done = plane.meshctl(
            "route", "set", "reviews", "--match", "header:end-user=jason", "--to", "v3"
        )
        assert done.returncode == 0, done.stderr
        virtual = json.loads(plane.meshctl("get", "vs", "reviews", "-o", "json").stdout)
        http = virtual["spec"]["http"]
        assert http[0]["match"] == [{"headers": {"end-user": {"exact": "jason"}}}]
        assert [(d["destination"]["subset"], d["weight"]) for d in http[1]["route"]] == [
            ("v1", 90),
            ("v2", 10),
        ]
        version = virtual["metadata"]["resourceVersion"]

        for args, message in [
            (["--weights", "v1=90,v2=20"], "sum to 110"),
            (["--weights", "v1"], "VERSION=PERCENT"),
            (["--match", "header:end-user=jason"], "--match and --to go together"),
            (["--match", "end-user", "--to", "v3"], "write header:NAME=VALUE"),
            ([], "give --weights"),
        ]:
            refused = plane.meshctl("route", "set", "reviews", *args)
            assert refused.returncode == 2, (args, refused.stdout, refused.stderr)
            assert message in refused.stderr, refused.stderr
        for args in (
            ["--step", "0"],
            ["--interval", "fast"],
            ["--max-error-rate", "x"],
            ["--to", "v1"],
        ):
            base = {"--from": "v1", "--to": "v2"}
            if args[0] == "--to":
                base["--to"] = "v1"
                args = []
            flags = [item for pair in base.items() for item in pair]
            refused = plane.meshctl("route", "shift", "reviews", *flags, *args)
            assert refused.returncode == 2, (args, refused.stderr)
        unchanged = json.loads(plane.meshctl("get", "vs", "reviews", "-o", "json").stdout)
        assert unchanged["metadata"]["resourceVersion"] == version

        # A VirtualService that routes other hosts too is left to `meshctl apply`.
        shared = (
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
            "metadata: {name: both, namespace: other}\n"
            "spec: {hosts: [reviews, ratings], http: [{route: [{destination: {host: reviews}}]}]}\n"
        )
        assert plane.meshctl("apply", "-f", "-", stdin=shared).returncode == 0
        refused = plane.meshctl("route", "set", "reviews", "-n", "other", "--weights", "v1=100")
        assert refused.returncode == 2 and "routes several hosts" in refused.stderr, refused.stderr

        # No instance to shift to: refused before anything changes.
        refused = plane.meshctl("route", "shift", "reviews", "--from", "v1", "--to", "v2")
        assert refused.returncode == 2 and "nothing to shift to" in refused.stderr, refused.stderr

        shown = plane.meshctl("route", "show", "reviews", "--no-live")
        assert shown.returncode == 0, shown.stderr
        assert "header end-user=jason" in shown.stdout and "v1=90 v2=10" in shown.stdout
    finally:
        plane.stop()


# --- with sidecars and traffic ---------------------------------------------------------------


class Mesh:
    def __init__(self, plane: ControlPlane, client: Sidecar) -> None:
        self.plane, self.client = plane, client

    def ask(self, headers: dict[str, str] | None = None) -> str:
        """One request to reviews through the client sidecar; the version that answered."""
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({"http": f"http://127.0.0.1:{self.client.outbound_port}"})
        )
        request = urllib.request.Request("http://reviews:9080/", headers=headers or {})
        try:
            with opener.open(request, timeout=3) as response:
                return json.loads(response.read())["version"]
        except urllib.error.HTTPError as error:
            return f"HTTP {error.code}"
        except OSError as error:
            return f"error: {type(error).__name__}"

    def versions(self, count: int, **kwargs) -> Counter:
        return Counter(self.ask(**kwargs) for _ in range(count))

    def set(self, *args: str) -> None:
        done = self.plane.meshctl("route", "set", "reviews", *args)
        assert done.returncode == 0, done.stderr

    def traffic(self) -> tuple[threading.Event, list[threading.Thread]]:
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                self.ask()
                stop.wait(0.005)

        threads = [threading.Thread(target=loop, daemon=True) for _ in range(2)]
        for thread in threads:
            thread.start()
        return stop, threads


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """reviews v1 and v2 healthy, v3 answering 500 to half its requests; a client sidecar."""
    directory = tmp_path_factory.mktemp("route")
    plane = start_control_plane(directory / "plane", "--xds-port", "0")
    sidecars: list[Sidecar] = []
    try:
        for version, fail_rate in (("v1", 0), ("v2", 0), ("v3", 0.5)):
            app_port = free_port()
            sidecars.append(
                Sidecar(
                    plane, directory, "reviews", "--version", version, "--app-port", str(app_port),
                    "--service-port", "9080", "--inbound-port", str(free_port()),
                    command=[sys.executable, "-m", "meshctl.demo.apps", "details", "--port", str(app_port),
                             "--version", version, "--fail-rate", str(fail_rate)],
                )
            )  # fmt: skip
        client = Sidecar(plane, directory, "productpage")
        sidecars.append(client)

        def ready() -> object:
            found = sorted(
                s["version"] for s in registered(plane) if s["service"] == "reviews" and s["ready"]
            )
            return found == ["v1", "v2", "v3"] or found

        wait_until(ready, 30, "three reviews instances ready")
        mesh = Mesh(plane, client)
        wait_until(lambda: not any(v.startswith(("HTTP", "error")) for v in mesh.versions(3)) or mesh.versions(3),
                   10, "reviews reached through the client sidecar")  # fmt: skip
        yield mesh
    finally:
        for sidecar in sidecars:
            sidecar.stop()
        plane.stop()


def test_traffic_follows_route_set_and_the_header_rule(mesh: Mesh):
    mesh.set("--weights", "v1=100")
    wait_until(lambda: mesh.versions(5) == Counter(v1=5) or mesh.versions(5), 5, "v1=100")
    mesh.set("--weights", "v1=0,v2=100")
    wait_until(lambda: mesh.versions(5) == Counter(v2=5) or mesh.versions(5), 5, "v2=100")
    assert mesh.versions(20) == Counter(v2=20)
    mesh.set("--match", "header:end-user=jason", "--to", "v1")
    wait_until(
        lambda: mesh.versions(5, headers={"end-user": "jason"}) == Counter(v1=5), 5, "jason → v1"
    )
    assert mesh.versions(10, headers={"end-user": "jason"}) == Counter(v1=10)
    assert mesh.versions(20) == Counter(v2=20)  # the weights were kept
    mesh.set("--weights", "v1=50,v2=50")
    wait_until(lambda: set(mesh.versions(10)) == {"v1", "v2"} or mesh.versions(10), 5, "50/50")
    split = mesh.versions(200)
    assert set(split) == {"v1", "v2"} and 70 <= split["v1"] <= 130, split


def test_route_show_reports_the_live_split_from_the_sidecars(mesh: Mesh):
    mesh.set("--weights", "v1=80,v2=20")
    wait_until(lambda: mesh.versions(20)["v2"] < 20, 5, "80/20 in effect")
    stop, threads = mesh.traffic()
    try:
        shown = mesh.plane.meshctl("route", "show", "reviews", "--window", "3s", "-o", "json")
        text = mesh.plane.meshctl("route", "show", "reviews", "--window", "1s")
    finally:
        stop.set()
        for thread in threads:
            thread.join(5)
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    assert report["defaultWeights"] == {"v1": 80, "v2": 20}
    assert report["instances"]["v3"] == {"ready": 1, "total": 1}
    live = report["live"]
    assert live["sidecarsRead"] == 4 and live["unreachable"] == {}, live
    counts = {version: entry["requests"] for version, entry in live["versions"].items()}
    total = sum(counts.values())
    assert total >= 20 and counts.get("v2", 0) >= 1, live
    assert counts.get("v1", 0) / total >= 0.55, live
    assert text.returncode == 0, text.stderr
    assert "live split over" in text.stdout and re.search(r"\n  v1 +\d+ ", text.stdout), text.stdout
    print(text.stdout)


def test_shift_reaches_a_healthy_version_and_rolls_back_a_failing_one(mesh: Mesh):
    mesh.set("--weights", "v1=100")
    stop, threads = mesh.traffic()
    try:
        healthy = mesh.plane.meshctl(
            "route", "shift", "reviews", "--from", "v1", "--to", "v2", "--step", "50",
            "--interval", "1s", "--max-error-rate", "1%", "--min-requests", "10",
        )  # fmt: skip
        assert healthy.returncode == 0, healthy.stdout + healthy.stderr
        assert "step 2/2: v1=0 v2=100" in healthy.stdout and "done" in healthy.stdout, (
            healthy.stdout
        )
        assert mesh.versions(10) == Counter(v2=10)

        mesh.set("--weights", "v1=100")
        failing = mesh.plane.meshctl(
            "route", "shift", "reviews", "--from", "v1", "--to", "v3", "--step", "25",
            "--interval", "1s", "--max-error-rate", "5%", "--min-requests", "10",
        )  # fmt: skip
    finally:
        stop.set()
        for thread in threads:
            thread.join(5)
    print(healthy.stdout, failing.stdout, sep="\n")
    assert failing.returncode == 5, failing.stdout + failing.stderr
    assert "step 1/4: v1=75 v3=25" in failing.stdout, failing.stdout
    assert "rolled back" in failing.stdout and "step 2/4" not in failing.stdout, failing.stdout
    virtual = json.loads(mesh.plane.meshctl("get", "vs", "reviews", "-o", "json").stdout)
    default = virtual["spec"]["http"][-1]["route"]
    assert {d["destination"]["subset"]: d["weight"] for d in default} == {"v1": 100, "v3": 0}
    assert mesh.versions(10) == Counter(v1=10)


def test_shift_stops_when_someone_else_changes_the_route(mesh: Mesh):
    mesh.set("--weights", "v1=100")
    stop, threads = mesh.traffic()
    shift = subprocess.Popen(
        [sys.executable, "-m", "meshctl", "route", "shift", "reviews", "--from", "v1",
         "--to", "v2", "--step", "50", "--interval", "2s", "--min-requests", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=mesh.plane.env,
    )  # fmt: skip
    try:
        first = shift.stdout.readline() + shift.stdout.readline()
        assert "step 1/2: v1=50 v2=50" in first, first
        mesh.set("--weights", "v1=90,v2=10")
        out, err = shift.communicate(timeout=30)
    finally:
        stop.set()
        for thread in threads:
            thread.join(5)
        if shift.poll() is None:
            shift.kill()
            shift.wait()
    assert shift.returncode == 3, (first, out, err)
    assert "changed during the shift" in err, err
    virtual = json.loads(mesh.plane.meshctl("get", "vs", "reviews", "-o", "json").stdout)
    default = virtual["spec"]["http"][-1]["route"]
    assert {d["destination"]["subset"]: d["weight"] for d in default} == {"v1": 90, "v2": 10}
