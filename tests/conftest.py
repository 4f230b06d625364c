"""Fixtures for the end-to-end data-plane suite: upstream servers, data planes, port allocation."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers.dataplane import KINDS, start_dataplane  # noqa: E402
from helpers.ports import free_port  # noqa: E402
from helpers.procs import Process, start_upstream  # noqa: E402


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--dataplane",
        default=os.environ.get("MESHCTL_TEST_DATAPLANES", ",".join(KINDS)),
        help="comma-separated data planes to run the end-to-end tests on (envoy, meshctl)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "meshctl_only: the test exercises meshctl itself, not a shared behaviour")
    config.addinivalue_line("markers", "envoy_only: the test checks Envoy itself, as the reference for meshctl")


def selected_kinds(config: pytest.Config) -> list[str]:
    kinds = [kind.strip() for kind in config.getoption("--dataplane").split(",") if kind.strip()]
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise pytest.UsageError(f"unknown --dataplane {sorted(unknown)}; choose from {KINDS}")
    return kinds


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "dataplane_kind" in metafunc.fixturenames:
        metafunc.parametrize("dataplane_kind", selected_kinds(metafunc.config))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # `--dataplane envoy` is how the suite is checked before the engine exists: meshctl-only
    # tests are then deselected (not skipped), so the report says exactly what ran.
    kinds = selected_kinds(config)
    unwanted = {f"{kind}_only" for kind in KINDS if kind not in kinds}
    kept, deselected = [], []
    for item in items:
        (deselected if any(item.get_closest_marker(marker) for marker in unwanted) else kept).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept


@pytest.fixture
def port() -> int:
    """One free loopback port for a listener."""
    return free_port()


@pytest.fixture(scope="session")
def upstream_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("upstreams")


def _session_upstream(upstream_logs: Path, script: str, *args: str):
    process = start_upstream(script, upstream_logs, *args)
    yield process
    process.stop()


@pytest.fixture(scope="session")
def echo_a(upstream_logs: Path):
    """HTTP/1.1 + h2c echo upstream that answers with name "a"."""
    yield from _session_upstream(upstream_logs, "http_echo.py", "--name", "a")


@pytest.fixture(scope="session")
def echo_b(upstream_logs: Path):
    """A second echo upstream, name "b", so tests can tell which cluster was picked."""
    yield from _session_upstream(upstream_logs, "http_echo.py", "--name", "b")


@pytest.fixture(scope="session")
def grpc_upstream(upstream_logs: Path):
    yield from _session_upstream(upstream_logs, "grpc_echo.py", "--name", "g")


@pytest.fixture(scope="session")
def ws_upstream(upstream_logs: Path):
    yield from _session_upstream(upstream_logs, "ws_echo.py")


@pytest.fixture(scope="session")
def line_upstream(upstream_logs: Path):
    yield from _session_upstream(upstream_logs, "line_server.py", "--name", "lines")


@pytest.fixture
def dataplane(dataplane_kind: str, tmp_path: Path):
    """Factory: `dataplane(bootstrap_dict)` starts the parametrized data plane and returns its Process.

    Every data plane started is stopped (by PID) at teardown; its log is printed so pytest shows it
    with a failing test.
    """
    started: list[Process] = []

    def start(config: dict, **kwargs) -> Process:
        process = start_dataplane(dataplane_kind, config, tmp_path, **kwargs)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()
        print(f"--- {process.name} log ({process.log_path}) ---\n{process.log()}")


@pytest.fixture
def meshctl_dataplane(tmp_path: Path):
    """Like `dataplane`, but always `meshctl run` (for meshctl-only behaviour)."""
    started: list[Process] = []

    def start(config: dict, **kwargs) -> Process:
        process = start_dataplane("meshctl", config, tmp_path, **kwargs)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()
        print(f"--- meshctl log ({process.log_path}) ---\n{process.log()}")
