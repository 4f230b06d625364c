"""HTTP/2 conformance: h2spec against `meshctl run` with an HTTP/2-only listener; every case must pass.

h2spec (github.com/summerwind/h2spec) is a Go tool; scripts/test.sh installs it with
`go install github.com/summerwind/h2spec/cmd/h2spec@latest`. It is looked up as H2SPEC_BIN, on
PATH, then in $GOBIN, $GOPATH/bin and ~/go/bin. A missing h2spec fails this test (it is never
skipped), so CI cannot pass without having run it.

Only the HTTP/2-only listener (codec_type HTTP2) is held to every case: on an AUTO listener an
invalid connection preface falls back to HTTP/1.1, as Envoy's AUTO does, which h2spec's
http2/3.5/2 counts as a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from helpers import bootstrap as b

INSTALL = "go install github.com/summerwind/h2spec/cmd/h2spec@latest"
# h2spec 2.x has 145 cases (generic, http2, hpack); fewer means the run was cut short.
EXPECTED_CASES = 145


def h2spec_binary() -> str:
    if os.environ.get("H2SPEC_BIN"):
        return os.environ["H2SPEC_BIN"]
    found = shutil.which("h2spec")
    if found:
        return found
    directories = [os.environ.get("GOBIN", "")]
    directories += [str(Path(p) / "bin") for p in os.environ.get("GOPATH", "").split(os.pathsep) if p]
    directories.append(str(Path.home() / "go" / "bin"))
    for directory in filter(None, directories):
        candidate = Path(directory) / "h2spec"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    pytest.fail(
        f"h2spec is not installed (looked at H2SPEC_BIN, PATH, GOBIN, GOPATH/bin, ~/go/bin). "
        f"scripts/test.sh installs it: {INSTALL}",
        pytrace=False,
    )


@dataclass
class Report:
    total: int = 0
    passed: int = 0
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def read_junit(path: Path) -> Report:
    report = Report()
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        report.total += 1
        name = f"{case.get('package')} {case.get('classname')}"
        problem = case.find("failure")
        if problem is None:
            problem = case.find("error")
        if problem is not None:
            report.failed.append(f"{name}: {(problem.text or '').strip()}")
        elif case.find("skipped") is not None:
            report.skipped.append(name)
        else:
            report.passed += 1
    return report


@pytest.mark.meshctl_only
def test_h2spec_passes_every_case_on_an_http2_only_listener(meshctl_dataplane, echo_a, port, tmp_path: Path):
    binary = h2spec_binary()
    routes = b.route_configuration("local", [b.virtual_host("all", [b.route("upstream")])])
    config = b.bootstrap(
        [b.http_listener("http", port, routes, codec_type="HTTP2")],
        [b.cluster("upstream", echo_a.port, http2=True)],
    )
    meshctl_dataplane(config)
    junit = tmp_path / "h2spec.xml"
    # -o: seconds h2spec waits for an expected frame; generous, as CI machines are shared.
    completed = subprocess.run(
        [binary, "-h", "127.0.0.1", "-p", str(port), "-o", "5", "-j", str(junit)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert junit.exists(), f"h2spec wrote no report (exit {completed.returncode}):\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"
    report = read_junit(junit)
    summary = completed.stdout.strip().splitlines()[-1] if completed.stdout.strip() else ""
    print(f"h2spec on meshctl, codec_type HTTP2: {report.passed}/{report.total} passed, "
          f"{len(report.failed)} failed, {len(report.skipped)} skipped ({summary})")
    assert not report.failed, "h2spec cases failed:\n" + "\n".join(report.failed)
    assert not report.skipped, f"h2spec skipped cases: {report.skipped}"
    assert report.total >= EXPECTED_CASES, f"h2spec ran {report.total} cases, expected {EXPECTED_CASES}:\n{completed.stdout[-3000:]}"
    assert completed.returncode == 0, f"h2spec exited {completed.returncode}:\n{completed.stdout[-3000:]}"
