"""SIGTERM to `meshctl run` during load: requests in flight finish, new connections are refused (meshctl only)."""

from __future__ import annotations

import signal
import socket
import threading
import time

import pytest

from helpers.bootstrap import simple_proxy
from helpers.http_client import Http1Client

pytestmark = pytest.mark.meshctl_only

DRAIN_TIMEOUT = 5.0
IN_FLIGHT = 8
UPSTREAM_DELAY_MS = 1500


def test_sigterm_drains_in_flight_requests(meshctl_dataplane, port, echo_a):
    sidecar = meshctl_dataplane(
        simple_proxy(port, echo_a.port), extra_args=["--drain-timeout", str(DRAIN_TIMEOUT)]
    )
    results: list[tuple[int, str] | str] = []
    lock = threading.Lock()

    def slow_request(index: int) -> None:
        client = Http1Client(port, timeout=DRAIN_TIMEOUT + 5)
        try:
            response = client.get(f"/slow/{index}?delay_ms={UPSTREAM_DELAY_MS}")
            outcome: tuple[int, str] | str = (response.status, response.json()["path"])
        except Exception as error:  # anything but a 200 is what this test reports
            outcome = f"{type(error).__name__}: {error}"
        finally:
            client.close()
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=slow_request, args=(index,)) for index in range(IN_FLIGHT)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)  # every request has reached the upstream, which holds it for 1.5 s

    signalled = time.monotonic()
    sidecar.popen.send_signal(signal.SIGTERM)

    # Within a second of SIGTERM the listener stops accepting.
    refused = False
    while time.monotonic() - signalled < 1.0:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                pass
        # A probe that lands in the backlog just before the socket closes is reset, not refused:
        # either way it was not accepted.
        except (ConnectionRefusedError, ConnectionResetError):
            refused = True
            break
        time.sleep(0.05)
    assert refused, "new connections were still accepted 1 s after SIGTERM"

    for thread in threads:
        thread.join(DRAIN_TIMEOUT + 10)
    expected = sorted((200, f"/slow/{index}") for index in range(IN_FLIGHT))
    assert sorted(results, key=str) == sorted(expected, key=str), f"in-flight outcomes: {results}"

    exit_code = sidecar.popen.wait(DRAIN_TIMEOUT + 5)
    elapsed = time.monotonic() - signalled
    assert exit_code == 0, f"exit {exit_code}:\n{sidecar.log()}"
    assert elapsed <= DRAIN_TIMEOUT + 1.0, f"took {elapsed:.1f}s to exit (drain timeout {DRAIN_TIMEOUT}s)"
