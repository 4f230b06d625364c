"""`meshctl run` keeps trio (≈10 MB resident) out of the sidecar: no module on its path imports it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers.bootstrap import simple_proxy
from helpers.ports import free_port

REPO = Path(__file__).resolve().parent.parent


def trio_modules(module_names: list[str]) -> list[str]:
    return [name for name in module_names if name == "trio" or name.startswith("trio.")]


def test_the_modules_of_meshctl_run_do_not_import_trio():
    code = (
        "import sys\n"
        "import meshctl.cli, meshctl.cli.run, meshctl.agent.supervisor\n"
        "print(*sys.modules, sep='\\n')\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    assert "meshctl.agent.supervisor" in loaded
    assert trio_modules(loaded) == []


@pytest.mark.meshctl_only
def test_a_whole_meshctl_run_never_imports_trio(tmp_path: Path):
    # -X importtime lists every module imported while the command runs, lazy imports included,
    # so this covers the engine start, supervision and the drain.
    path = tmp_path / "bootstrap.yaml"
    path.write_text(yaml.safe_dump(simple_proxy(free_port(), free_port())))
    finished = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "meshctl", "run", "--bootstrap", str(path)]
        + ["--drain-timeout", "0", "--", "true"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert finished.returncode == 0, finished.stderr
    loaded = [
        line.rpartition("|")[2].strip()
        for line in finished.stderr.splitlines()
        if line.startswith("import time:")
    ]
    assert "meshctl.agent.supervisor" in loaded
    assert trio_modules(loaded) == []
