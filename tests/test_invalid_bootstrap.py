"""Invalid bootstraps: `meshctl run` exits 2 naming the field; Envoy refuses the same files where it does."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from helpers.dataplane import dataplane_command, envoy_binary, unique_base_id
from helpers.invalid_bootstraps import CASES, Invalid, base_bootstrap
from helpers.ports import free_port, port_accepts


def write_case(case: Invalid, directory: Path) -> tuple[Path, int]:
    listener_port = free_port()
    path = directory / f"{case.id}.yaml"
    if case.text is not None:
        path.write_text(case.text)
    else:
        config = base_bootstrap(listener_port, free_port())
        assert case.mutate is not None
        case.mutate(config)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, listener_port


def run_bounded(command: list[str], timeout: float = 20.0) -> subprocess.CompletedProcess:
    """Run to completion; a data plane that starts serving an invalid config is killed (by PID) and reported."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        pytest.fail(f"{command[0]} accepted the config and kept running:\n{stdout}\n{stderr}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.mark.meshctl_only
@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_meshctl_run_refuses(case: Invalid, tmp_path: Path):
    path, listener_port = write_case(case, tmp_path)
    completed = run_bounded(dataplane_command("meshctl", path))
    assert completed.returncode == 2, f"exit {completed.returncode}\nstdout:\n{completed.stdout}\nstderr:\n{completed.stderr}"
    message = completed.stderr.lower()
    for name in case.names:
        alternatives = name.lower().split("|")
        assert any(word in message for word in alternatives), (
            f"stderr does not name {name!r} ({case.why or case.id}):\n{completed.stderr}"
        )
    assert not port_accepts(listener_port), "nothing may be left listening after a refused bootstrap"


@pytest.mark.envoy_only
@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_envoy_refuses_where_it_does(case: Invalid, tmp_path: Path):
    path, _ = write_case(case, tmp_path)
    completed = run_bounded(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--base-id", str(unique_base_id()), "-l", "critical"]
    )
    refused = completed.returncode != 0
    assert refused == case.envoy_refuses, (
        f"envoy {'refused' if refused else 'accepted'} it ({case.why or 'expected the opposite'}):\n"
        f"{completed.stdout[-2000:]}{completed.stderr[-2000:]}"
    )
