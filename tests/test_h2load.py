"""h2load (nghttp2) drives HTTP/2 and HTTP/1.1 load through the sidecar: every request must succeed."""

from __future__ import annotations

import re
import subprocess

import pytest

from helpers.bootstrap import simple_proxy

SUMMARY = re.compile(
    r"requests: (?P<total>\d+) total, (?P<started>\d+) started, (?P<done>\d+) done, "
    r"(?P<succeeded>\d+) succeeded, (?P<failed>\d+) failed, (?P<errored>\d+) errored, (?P<timeout>\d+) timeout"
)
STATUS = re.compile(r"status codes: (?P<s2xx>\d+) 2xx, (?P<s3xx>\d+) 3xx, (?P<s4xx>\d+) 4xx, (?P<s5xx>\d+) 5xx")


def h2load(*args: str) -> dict[str, int]:
    completed = subprocess.run(["h2load", *args], capture_output=True, text=True, timeout=120)
    summary = SUMMARY.search(completed.stdout)
    statuses = STATUS.search(completed.stdout)
    assert summary and statuses, f"h2load printed no summary:\n{completed.stdout}\n{completed.stderr}"
    return {key: int(value) for key, value in {**summary.groupdict(), **statuses.groupdict()}.items()}


@pytest.mark.parametrize(
    "mode, flags",
    [("h2c", ["-c", "4", "-m", "10"]), ("http1.1", ["--h1", "-c", "4"])],
)
@pytest.mark.parametrize("upstream_http2", [False, True], ids=["upstream-h1", "upstream-h2c"])
def test_h2load_all_requests_succeed(dataplane, port, echo_a, mode, flags, upstream_http2):
    dataplane(simple_proxy(port, echo_a.port, http2_upstream=upstream_http2))
    result = h2load("-n", "2000", *flags, "-T", "30", f"http://127.0.0.1:{port}/load")
    assert result["total"] == result["done"] == result["succeeded"] == 2000, result
    assert result["failed"] == result["errored"] == result["timeout"] == 0, result
    assert result["s2xx"] == 2000, result
