"""`meshctl run`: argument and bootstrap errors exit 2 naming the field; app supervision and exit codes.

Tests marked meshctl_only need the engine (meshctl._core); the others run without it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers.bootstrap import simple_proxy, socket_address
from helpers.dataplane import meshctl_command
from helpers.ports import free_port, port_accepts

REPO = Path(__file__).resolve().parent.parent

# Runs meshctl.agent.supervisor.serve with a stand-in engine, so supervision is tested alone.
SUPERVISE = """
import sys
from meshctl.agent import supervisor

class Engine:
    def drain(self, timeout):
        print(f"drained {timeout}", flush=True)

sys.exit(supervisor.serve(Engine(), sys.argv[1:] or None, 0.5))
"""

# An application that says when it is ready and exits 7 on SIGTERM.
TRAPS_SIGTERM = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))\n"
    "print('app ready', flush=True)\n"
    "time.sleep(60)\n"
)


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def start(command: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        command,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def finish(process: subprocess.Popen[str], timeout: float = 20) -> tuple[int, str, str]:
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        pytest.fail(f"still running after {timeout}s:\n{stdout}\n{stderr}")
    return process.returncode, stdout, stderr


def run(command: list[str], timeout: float = 20) -> tuple[int, str, str]:
    return finish(start(command), timeout)


def wait_until_catching(pid: int, signum: int, timeout: float = 10) -> None:
    """Wait until `pid` has a handler for `signum` (SigCgt in /proc), so sending it is not fatal."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = Path(f"/proc/{pid}/status").read_text()
        caught = int(
            next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16
        )
        if caught & (1 << (signum - 1)):
            return
        time.sleep(0.02)
    pytest.fail(f"process {pid} never started handling signal {signum}")


def read_line_with(process: subprocess.Popen[str], words: str) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        if words in line:
            return
    pytest.fail(f"{words!r} never printed")


def meshctl_run(*args: str) -> list[str]:
    return [*meshctl_command(), "run", *args]


def write_bootstrap(directory: Path, config: dict) -> Path:
    path = directory / "bootstrap.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# --- supervision, with a stand-in engine -------------------------------------------------------


def test_exit_status_is_what_a_shell_reports():
    from meshctl.agent.supervisor import exit_status

    assert exit_status(0) == 0
    assert exit_status(3) == 3
    assert exit_status(-signal.SIGTERM) == 128 + signal.SIGTERM
    assert exit_status(-signal.SIGKILL) == 137


def test_the_app_exit_status_becomes_meshctls_after_the_drain():
    status, stdout, _ = run(python(SUPERVISE) + python("raise SystemExit(3)"))
    assert status == 3
    assert stdout == "drained 0.5\n"


def test_an_app_killed_by_a_signal_gives_128_plus_the_signal():
    status, stdout, _ = run(
        python(SUPERVISE) + python("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    )
    assert status == 128 + signal.SIGKILL
    assert "drained" in stdout


def test_an_app_that_cannot_start_gives_127_and_still_drains():
    status, stdout, stderr = run(python(SUPERVISE) + ["no-such-command-for-meshctl-tests"])
    assert status == 127
    assert "no-such-command-for-meshctl-tests: command not found" in stderr
    assert "drained" in stdout


def test_sigterm_is_passed_to_the_app_and_its_status_returned():
    process = start(python(SUPERVISE) + python(TRAPS_SIGTERM))
    read_line_with(process, "app ready")
    process.send_signal(signal.SIGTERM)
    status, stdout, _ = finish(process)
    assert status == 7
    assert stdout == "drained 0.5\n"


def test_sigint_is_left_to_the_terminal_and_not_passed_on():
    process = start(python(SUPERVISE) + python(TRAPS_SIGTERM))
    read_line_with(process, "app ready")
    process.send_signal(signal.SIGINT)
    time.sleep(0.3)
    assert process.poll() is None, "a SIGINT sent to meshctl alone must not end the app"
    process.send_signal(signal.SIGTERM)
    assert finish(process)[0] == 7


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_without_an_app_a_signal_drains_and_exits_0(signum: int):
    process = start(python(SUPERVISE))
    # Python catches SIGINT from startup on, so SIGTERM's handler (which supervision installs
    # together with its SIGINT one) is what tells that supervision is listening.
    wait_until_catching(process.pid, signal.SIGTERM)
    process.send_signal(signum)
    status, stdout, stderr = finish(process)
    assert (status, stdout) == (0, "drained 0.5\n"), stderr


# --- command-line and bootstrap errors that need no engine -------------------------------------


def test_bootstrap_is_required():
    status, _, stderr = run(meshctl_run())
    assert status == 2
    assert "--bootstrap" in stderr


@pytest.mark.parametrize(
    "flag", [["--workers", "0"], ["--drain-timeout", "-1"], ["--workers", "many"]]
)
def test_bad_flag_values_exit_2(tmp_path: Path, flag: list[str]):
    path = write_bootstrap(tmp_path, simple_proxy(free_port(), free_port()))
    status, _, stderr = run(meshctl_run("--bootstrap", str(path), *flag))
    assert status == 2
    assert flag[0] in stderr


def test_a_missing_bootstrap_file_exits_2(tmp_path: Path):
    status, stdout, stderr = run(meshctl_run("--bootstrap", str(tmp_path / "none.yaml")))
    assert status == 2
    assert stdout == ""
    assert (
        stderr == f"meshctl run: {tmp_path / 'none.yaml'}: cannot read: No such file or directory\n"
    )


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda c: c["static_resources"]["listeners"][0].update(adress={}),
            'static_resources.listeners[0].adress: unknown field "adress"',
        ),
        (
            lambda c: c["static_resources"]["clusters"][0].update(connect_timeout=5),
            "static_resources.clusters[0].connect_timeout:",
        ),
        (
            lambda c: c["static_resources"]["clusters"][0].update(type="SOMETIMES"),
            'static_resources.clusters[0].type: "SOMETIMES" is not a DiscoveryType',
        ),
    ],
)
def test_a_bootstrap_that_does_not_parse_exits_2_naming_the_field(
    tmp_path: Path, mutate, expected: str
):
    config = simple_proxy(free_port(), free_port())
    mutate(config)
    path = write_bootstrap(tmp_path, config)
    status, stdout, stderr = run(meshctl_run("--bootstrap", str(path), "--", "false"))
    assert status == 2
    assert stdout == ""
    assert stderr.startswith(f"meshctl run: {path}: ")
    assert expected in stderr
    assert "Traceback" not in stderr


def test_malformed_yaml_exits_2_with_the_line(tmp_path: Path):
    path = tmp_path / "bootstrap.yaml"
    path.write_text("static_resources:\n  listeners: [\n")
    status, _, stderr = run(meshctl_run("--bootstrap", str(path)))
    assert status == 2
    assert "invalid YAML" in stderr
    assert "line 3" in stderr


# --- with the engine --------------------------------------------------------------------------


def proxy_with_admin(listener_port: int, admin_port: int) -> dict:
    config = simple_proxy(listener_port, free_port())
    config["admin"] = {"address": socket_address(admin_port)}
    return config


@pytest.mark.meshctl_only
@pytest.mark.parametrize(
    ("mutate", "names"),
    [
        (
            lambda c: c["static_resources"]["listeners"][0]["address"]["socket_address"].update(
                port_value=70000
            ),
            ["port_value"],
        ),
        (
            lambda c: c["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
                "typed_config"
            ]["route_config"]["virtual_hosts"][0]["routes"][0]["route"].update(cluster="nowhere"),
            ["nowhere", "cluster"],
        ),
    ],
)
def test_the_engine_refusing_a_bootstrap_exits_2_naming_the_field(tmp_path: Path, mutate, names):
    listener_port = free_port()
    config = simple_proxy(listener_port, free_port())
    mutate(config)
    path = write_bootstrap(tmp_path, config)
    status, _, stderr = run(meshctl_run("--bootstrap", str(path), "--", "true"))
    assert status == 2, stderr
    assert stderr.startswith(f"meshctl run: {path}: ")
    for name in names:
        assert name in stderr
    assert "Traceback" not in stderr


@pytest.mark.meshctl_only
def test_a_port_in_use_exits_2_naming_it(tmp_path: Path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = write_bootstrap(tmp_path, simple_proxy(port, free_port()))
        status, _, stderr = run(meshctl_run("--bootstrap", str(path), "--", "true"))
    assert status == 2, stderr
    assert "cannot bind" in stderr
    assert str(port) in stderr


@pytest.mark.meshctl_only
def test_the_app_starts_with_the_listeners_already_bound(tmp_path: Path):
    listener_port, admin_port = free_port(), free_port()
    path = write_bootstrap(tmp_path, proxy_with_admin(listener_port, admin_port))
    connects = f"import socket; socket.create_connection(('127.0.0.1', {listener_port}), timeout=2).close()"
    status, _, stderr = run(
        meshctl_run("--bootstrap", str(path), "--workers", "2", "--", *python(connects))
    )
    assert status == 0, stderr
    ready = [line for line in stderr.splitlines() if "sidecar ready" in line]
    assert len(ready) == 1, stderr
    assert f"listener http on 127.0.0.1:{listener_port}" in ready[0]
    assert f"admin on http://127.0.0.1:{admin_port}/" in ready[0]


@pytest.mark.meshctl_only
def test_meshctl_exits_with_the_app_status(tmp_path: Path):
    listener_port = free_port()
    path = write_bootstrap(tmp_path, simple_proxy(listener_port, free_port()))
    status, _, stderr = run(
        meshctl_run("--bootstrap", str(path), "--", *python("raise SystemExit(3)"))
    )
    assert status == 3, stderr
    assert not port_accepts(listener_port)


@pytest.mark.meshctl_only
def test_sigterm_to_meshctl_reaches_the_app_then_the_sidecar_drains(tmp_path: Path):
    listener_port = free_port()
    path = write_bootstrap(tmp_path, simple_proxy(listener_port, free_port()))
    process = start(
        meshctl_run("--bootstrap", str(path), "--drain-timeout", "1", "--", *python(TRAPS_SIGTERM))
    )
    read_line_with(process, "app ready")
    assert port_accepts(listener_port)
    process.send_signal(signal.SIGTERM)
    status, _, stderr = finish(process)
    assert status == 7, stderr
    assert not port_accepts(listener_port)


@pytest.mark.meshctl_only
def test_without_an_app_sigterm_drains_and_exits_0(tmp_path: Path):
    listener_port = free_port()
    path = write_bootstrap(tmp_path, simple_proxy(listener_port, free_port()))
    process = start(meshctl_run("--bootstrap", str(path), "--drain-timeout", "1"))
    deadline = time.monotonic() + 20
    while not port_accepts(listener_port):
        assert process.poll() is None and time.monotonic() < deadline, finish(process)
        time.sleep(0.05)
    wait_until_catching(process.pid, signal.SIGTERM)
    process.send_signal(signal.SIGTERM)
    status, _, stderr = finish(process)
    assert status == 0, stderr
    assert not port_accepts(listener_port)
