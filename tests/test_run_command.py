"""`meshctl run ... -- CMD`: the sidecar is ready before CMD starts, and meshctl exits with CMD's code."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from helpers.bootstrap import simple_proxy
from helpers.dataplane import start_dataplane
from helpers.ports import port_accepts

pytestmark = pytest.mark.meshctl_only

# The app makes one request, no retries: it only succeeds if the sidecar was ready first.
APP = """
import http.client, sys
connection = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=5)
connection.request("GET", "/from-app")
response = connection.getresponse()
open(sys.argv[2], "w").write(f"{response.status} " + response.read().decode())
sys.exit(int(sys.argv[3]))
"""


@pytest.mark.parametrize("app_exit_code", [0, 7])
def test_command_reaches_upstream_and_sets_exit_code(tmp_path: Path, port, echo_a, app_exit_code):
    seen = tmp_path / "app-saw.txt"
    sidecar = start_dataplane(
        "meshctl",
        simple_proxy(port, echo_a.port),
        tmp_path,
        extra_args=["--", sys.executable, "-c", APP, str(port), str(seen), str(app_exit_code)],
        wait_ports=[],  # the app is what checks readiness here
    )
    try:
        exit_code = sidecar.popen.wait(30)
    finally:
        sidecar.stop()
    assert exit_code == app_exit_code, f"meshctl exited {exit_code}, app exited {app_exit_code}:\n{sidecar.log()}"
    assert seen.exists(), f"the app never got a response:\n{sidecar.log()}"
    status, _, body = seen.read_text().partition(" ")
    assert status == "200"
    assert (json.loads(body)["name"], json.loads(body)["path"]) == ("a", "/from-app")
    time.sleep(0.2)
    assert not port_accepts(port), "the sidecar must stop after its app exits"
