"""The web dashboard as a user meets it: `meshctl demo` prints its URL, a real headless Chromium
loads the page, runs its script, and shows the demo's services, the calls between them with
their numbers, mTLS, and the split of reviews' requests, which follows the demo's weight shift.
Also `meshctl dashboard` on its own against a plane, and its refusals."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest

pytestmark = pytest.mark.meshctl_only
REPO = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Elements(HTMLParser):
    """Every element's attributes, of the DOM Chromium dumped after the page's script ran."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[dict[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found.append({"tag": tag, **{k: v or "" for k, v in attrs}})


def rendered(url: str, screenshot: Path | None = None) -> list[dict[str, str]]:
    """The page's DOM after Chromium loaded it and its script fetched /api/graph and drew."""
    command = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
               "--virtual-time-budget=4000", "--window-size=1400,800"]  # fmt: skip
    if screenshot is not None:
        subprocess.run([*command, f"--screenshot={screenshot}", url], capture_output=True, timeout=60, check=False)
    done = subprocess.run([*command, "--dump-dom", url], capture_output=True, text=True, timeout=60, check=True)
    parser = Elements()
    parser.feed(done.stdout)
    return parser.found


def edges(dom: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    return {e["data-edge"]: e for e in dom if "data-edge" in e}


def shares(dom: list[dict[str, str]], service: str = "default/reviews") -> dict[str, float]:
    """A service's split as the page shows it: version → share."""
    return {e["data-version"]: float(e["data-share"]) for e in dom if "data-version" in e and e.get("data-service") == service}


def wait_for(log: Path, pattern: str, timeout: float, process: subprocess.Popen) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(pattern, log.read_text(errors="replace"))
        if found:
            return found
        assert process.poll() is None, f"the demo ended early:\n{log.read_text(errors='replace')[-3000:]}"
        time.sleep(0.2)
    raise AssertionError(f"{pattern!r} not in the demo's output after {timeout}s:\n{log.read_text(errors='replace')[-3000:]}")


def settled_dom(url: str, check, timeout: float = 20.0) -> list[dict[str, str]]:
    """The DOM once `check(dom)` holds (windows are 2 s: the page needs one after a change)."""
    deadline = time.monotonic() + timeout
    while True:
        dom = rendered(url)
        if check(dom) or time.monotonic() > deadline:
            return dom
        time.sleep(1.0)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (scripts/test.sh installs it)")
def test_the_demo_dashboard_in_chromium_follows_the_weight_shift(tmp_path: Path) -> None:
    log = tmp_path / "demo.log"
    with open(log, "wb") as out:
        demo = subprocess.Popen([sys.executable, "-m", "meshctl", "demo", "--duration", "75"], cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)  # fmt: skip
    try:
        url = wait_for(log, r"dashboard: (http://127\.0\.0\.1:\d+/)", 120, demo).group(1)
        wait_for(log, r"step 1/3: reviews → v1=100", 30, demo)

        def first_phase(dom: list[dict[str, str]]) -> bool:
            return {"default/traffic->default/productpage", "default/productpage->default/reviews"} <= edges(dom).keys() and shares(dom).get("v1") == 1.0

        dom = settled_dom(url, first_phase)
        rendered(url, tmp_path / "dashboard-v1.png")  # kept with the test's files, to look at
        drawn = edges(dom)
        assert {"default/traffic->default/productpage", "default/productpage->default/reviews",
                "default/productpage->default/details"} <= drawn.keys(), drawn.keys()  # fmt: skip
        nodes = {e["data-node"] for e in dom if "data-node" in e}
        assert {"default/productpage", "default/reviews", "default/details", "default/ratings", "default/traffic"} <= nodes
        to_reviews = drawn["default/productpage->default/reviews"]
        assert float(to_reviews["data-rps"]) > 1.0
        assert float(to_reviews["data-success"]) > 0.9
        assert 0 < float(to_reviews["data-p99"]) < 1000
        assert to_reviews["data-mtls"] == "true", to_reviews  # the demo's sidecars talk mutual TLS
        assert shares(dom) == {"v1": 1.0}

        wait_for(log, r"step 3/3: reviews → v3=100", 60, demo)
        dom = settled_dom(url, lambda d: shares(d).get("v3") == 1.0)
        assert shares(dom) == {"v3": 1.0}
        # reviews v3 calls ratings: that edge is drawn now, with its own numbers.
        to_ratings = edges(dom).get("default/reviews->default/ratings")
        assert to_ratings is not None and float(to_ratings["data-rps"]) > 0.5, edges(dom).keys()
    finally:
        if demo.poll() is None:
            demo.send_signal(signal.SIGINT)
        demo.wait(60)


def test_dashboard_command_serves_the_graph_and_refuses_bad_input(tmp_path: Path) -> None:
    from helpers.control_plane import start_control_plane
    from helpers.ports import free_port

    plane = start_control_plane(tmp_path / "plane")
    try:
        bad = plane.meshctl("dashboard", "--interval", "0")
        assert bad.returncode == 2 and "--interval" in bad.stderr
        port = free_port()
        served = subprocess.Popen([sys.executable, "-m", "meshctl", "dashboard", "--port", str(port), "--interval", "0.5"],
                                  env=plane.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        try:
            assert served.stdout is not None
            assert f"dashboard: http://127.0.0.1:{port}/" in served.stdout.readline()
            busy = plane.meshctl("dashboard", "--port", str(port))
            assert busy.returncode == 1 and f"cannot serve on 127.0.0.1:{port}" in busy.stderr
            deadline = time.monotonic() + 10
            while True:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/graph", timeout=5) as response:
                    graph = json.load(response)
                if graph["windows"] > 0 or time.monotonic() > deadline:
                    break
                time.sleep(0.3)
            assert graph["windows"] > 0 and graph["edges"] == [] and graph["registryError"] == ""
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
                assert b"meshctl dashboard" in response.read()
        finally:
            served.send_signal(signal.SIGINT)
            assert served.wait(10) == 0
    finally:
        plane.stop()
    unreachable = subprocess.run([sys.executable, "-m", "meshctl", "dashboard", "--control-plane", f"127.0.0.1:{free_port()}",
                                  "--token", "x"], capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
    assert unreachable.returncode != 0 and "meshctl dashboard:" in unreachable.stderr
