"""Every command's --help renders (rich markup in help texts can break it)."""

from __future__ import annotations

import subprocess
import sys

import pytest

COMMANDS = [[], ["run"], ["serve"], ["apply"], ["get"], ["delete"], ["route"], ["route", "set"], ["route", "show"], ["route", "shift"], ["top"], ["dashboard"], ["demo"], ["prometheus-config"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "meshctl")
def test_help_renders(command):
    completed = subprocess.run([sys.executable, "-m", "meshctl", *command, "--help"], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    assert "Usage:" in completed.stdout
