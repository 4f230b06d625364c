"""Transparent capture for `meshctl run --capture`: iptables REDIRECT rules in the network
namespace meshctl runs in, installed before the app starts and removed when meshctl exits.

The rules live in two chains of the nat table that only meshctl uses, so removing them is exact:

    OUTPUT     -p tcp -j MESHCTL_OUTPUT
    MESHCTL_OUTPUT  -m owner --gid-owner SIDECAR_GID -j RETURN    the sidecar's own connections
    MESHCTL_OUTPUT  -d 127.0.0.0/8 -j RETURN                      loopback stays direct
    MESHCTL_OUTPUT  -p tcp -j REDIRECT --to-ports OUTBOUND        everything else the app sends
    PREROUTING -p tcp -j MESHCTL_PREROUTING
    MESHCTL_PREROUTING -p tcp --dport APP_PORT -j REDIRECT --to-ports INBOUND

How the sidecar's own traffic is told apart: the engine has no SO_MARK option, so by owner.
meshctl runs as root (iptables needs it) and so does the app, typically; their uids cannot differ
without dropping the app's privileges. Their *group* can: meshctl switches its effective gid to
a dedicated one (default 1337, Istio's proxy uid/gid) before the engine opens any socket, so
every socket of the engine, the ADS client and the registration carries that gid; the app is
started with the original gid (through a tiny exec shim), so its sockets are captured. Every
other process of the namespace is captured too, as in an Istio pod: run it in the app's own
network namespace.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

OUTPUT_CHAIN = "MESHCTL_OUTPUT"
PREROUTING_CHAIN = "MESHCTL_PREROUTING"
DEFAULT_SIDECAR_GID = 1337


class CaptureError(Exception):
    """Capture cannot be set up; str() says why and what to do."""


@dataclass(frozen=True)
class CaptureRules:
    outbound_port: int
    inbound_port: int
    app_port: int | None
    sidecar_gid: int = DEFAULT_SIDECAR_GID
    iptables: str = "iptables"

    def commands(self) -> list[list[str]]:
        """The iptables invocations that install the rules, in order."""
        nat = [self.iptables, "-w", "-t", "nat"]
        out = [
            [*nat, "-N", OUTPUT_CHAIN],
            [*nat, "-A", OUTPUT_CHAIN, "-m", "owner", "--gid-owner", str(self.sidecar_gid), "-j", "RETURN"],
            [*nat, "-A", OUTPUT_CHAIN, "-d", "127.0.0.0/8", "-j", "RETURN"],
            [*nat, "-A", OUTPUT_CHAIN, "-p", "tcp", "-j", "REDIRECT", "--to-ports", str(self.outbound_port)],
            [*nat, "-A", "OUTPUT", "-p", "tcp", "-j", OUTPUT_CHAIN],
        ]  # fmt: skip
        if self.app_port is not None:
            out += [
                [*nat, "-N", PREROUTING_CHAIN],
                [*nat, "-A", PREROUTING_CHAIN, "-p", "tcp", "--dport", str(self.app_port),
                 "-j", "REDIRECT", "--to-ports", str(self.inbound_port)],
                [*nat, "-A", "PREROUTING", "-p", "tcp", "-j", PREROUTING_CHAIN],
            ]  # fmt: skip
        return out

    def removal_commands(self) -> list[list[str]]:
        nat = [self.iptables, "-w", "-t", "nat"]
        return [
            [*nat, "-D", "OUTPUT", "-p", "tcp", "-j", OUTPUT_CHAIN],
            [*nat, "-F", OUTPUT_CHAIN],
            [*nat, "-X", OUTPUT_CHAIN],
            [*nat, "-D", "PREROUTING", "-p", "tcp", "-j", PREROUTING_CHAIN],
            [*nat, "-F", PREROUTING_CHAIN],
            [*nat, "-X", PREROUTING_CHAIN],
        ]

    def install(self) -> None:
        """Install every rule, or none (what was added is taken out again) and raise."""
        check_chains_free(self.iptables)  # again: another capture may have started meanwhile
        for command in self.commands():
            done = _iptables(command)
            if done.returncode != 0:
                self.remove()
                raise CaptureError(f"{' '.join(command)}: {done.stderr.strip() or f'exit {done.returncode}'}")

    def remove(self) -> None:
        """Take every meshctl rule out; missing ones are fine (a partial install)."""
        for command in self.removal_commands():
            _iptables(command)


def _iptables(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, check=False, timeout=30)


def check_capture_possible(iptables: str = "iptables") -> None:
    if not sys.platform.startswith("linux"):
        raise CaptureError("--capture needs Linux (iptables REDIRECT and SO_ORIGINAL_DST)")
    if os.geteuid() != 0:
        raise CaptureError("--capture needs root: it installs iptables rules")
    if shutil.which(iptables) is None:
        raise CaptureError(f"--capture needs {iptables} (Debian: apt-get install iptables)")


def check_chains_free(iptables: str = "iptables") -> None:
    """Refuse when meshctl's chains exist already: another capture owns this namespace."""
    for chain in (OUTPUT_CHAIN, PREROUTING_CHAIN):
        if _iptables([iptables, "-w", "-t", "nat", "-S", chain]).returncode == 0:
            raise CaptureError(
                f"iptables chain {chain} (nat) exists already: another `meshctl run --capture` "
                "runs in this network namespace, or one was killed before it could clean up. "
                f"Remove it with: iptables -t nat -D {chain.removeprefix('MESHCTL_')} -p tcp -j {chain}; "
                f"iptables -t nat -F {chain}; iptables -t nat -X {chain}"
            )


# Started in place of the app: back to the original group, no proxy variables (traffic is
# captured, not proxied), then exec the app itself, so it keeps the PID meshctl signals.
_SHIM = """\
import os, sys
gid = int(sys.argv[1])
os.setresgid(gid, gid, gid)
for name in ("HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy"):
    os.environ.pop(name, None)
try:
    os.execvp(sys.argv[2], sys.argv[2:])
except FileNotFoundError:
    print(f"meshctl run: cannot start {sys.argv[2]}: command not found", file=sys.stderr)
    sys.exit(127)
except OSError as error:
    print(f"meshctl run: cannot start {sys.argv[2]}: {error.strerror or error}", file=sys.stderr)
    sys.exit(126)
"""


def app_command(command: Sequence[str], app_gid: int) -> list[str]:
    """`command` started through the shim that gives it `app_gid` back."""
    return [sys.executable, "-c", _SHIM, str(app_gid), *command]


def run_captured(options, command: Sequence[str] | None, sidecar_gid: int = DEFAULT_SIDECAR_GID) -> int:
    """Install the rules, run the sidecar agent (meshctl.agent.mesh_agent.main) under the
    sidecar's gid and the app under the original one, and remove the rules however it ends
    (the app's exit, its failure to start, SIGTERM/SIGINT, an error); SIGKILL alone leaves them,
    and the next `--capture` run in the namespace says how to remove them."""
    from meshctl.agent.mesh_agent import main

    check_capture_possible()
    rules = CaptureRules(options.outbound_port, options.inbound_port, options.app_port, sidecar_gid)
    app_gid = os.getegid()

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    # Until the agent's own handlers take over (and after they let go), a SIGTERM still
    # unwinds through `finally` below instead of killing meshctl with its rules in place.
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        rules.install()
        try:
            os.setegid(sidecar_gid)  # before the engine opens its first socket
            print(
                f"meshctl run: capturing: TCP from this network namespace → :{options.outbound_port}"
                + (f", TCP to :{options.app_port} → :{options.inbound_port}" if options.app_port else "")
                + f"; the sidecar's own sockets (gid {sidecar_gid}) are not captured",
                file=sys.stderr, flush=True,
            )  # fmt: skip
            return main(options, app_command(command, app_gid) if command else None)
        finally:
            try:
                os.setegid(app_gid)
            finally:
                rules.remove()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
