"""`meshctl run` keeps the sidecar lean: no trio on its path, no CLI or protobuf library resident."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers.bootstrap import simple_proxy
from helpers.ports import free_port

REPO = Path(__file__).resolve().parent.parent
# -X importtime prints this header when an interpreter starts, so it also marks meshctl's exec.
IMPORTTIME_HEADER = "import time: self [us] | cumulative | imported package"


def among(packages: tuple[str, ...], module_names: list[str]) -> list[str]:
    return [name for name in module_names if name.split(".")[0] in packages]


def test_the_modules_of_meshctl_run_do_not_import_trio():
    code = (
        "import sys\n"
        "import meshctl.cli, meshctl.cli.run, meshctl.agent.sidecar\n"
        "print(*sys.modules, sep='\\n')\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    assert "meshctl.agent.supervisor" in loaded
    assert among(("trio",), loaded) == []


@pytest.mark.meshctl_only
def test_the_sidecar_process_holds_only_the_engine_and_supervision(tmp_path: Path):
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
    processes: list[list[str]] = []
    for line in finished.stderr.splitlines():
        if line == IMPORTTIME_HEADER:
            processes.append([])
        elif line.startswith("import time:"):
            processes[-1].append(line.rpartition("|")[2].strip())
    # The CLI, then the sidecar it became by exec.
    assert len(processes) == 2, finished.stderr
    cli, sidecar = processes
    assert among(("trio",), cli) == []
    assert "meshctl._core" in sidecar
    assert "meshctl.agent.supervisor" in sidecar
    assert among(("trio", "typer", "pydantic", "yaml", "google", "envoy"), sidecar) == []
