"""Supervises the application beside a running engine: forwards SIGTERM, then drains the engine."""

import signal
import subprocess
import sys
from collections.abc import Sequence
from typing import Protocol

from meshctl.agent.signal_queue import SignalQueue

# The exit statuses a shell gives when a command cannot be run, so scripts can tell them apart.
COMMAND_NOT_FOUND = 127
COMMAND_NOT_EXECUTABLE = 126

# What ends a run without an application; with one, SIGTERM is passed on to it instead.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Drainable(Protocol):
    """What supervision needs of meshctl._core.Engine."""

    def drain(self, timeout: float = 5.0) -> None: ...


def serve(engine: Drainable, command: Sequence[str] | None, drain_timeout: float) -> int:
    """Wait for `command` to exit (without one: for SIGTERM or SIGINT), then drain `engine`.

    The engine is already serving, so the application starts with its sidecar ready. Returns
    meshctl's exit status: the application's, as a shell would report it, or 0 without one.
    Call it from the main thread: only that thread receives signals.
    """
    # With an application, SIGCHLD is queued too, so one blocking wait hears of its exit or of
    # a signal to pass on, whichever comes first.
    signums = (*STOP_SIGNALS, signal.SIGCHLD) if command else STOP_SIGNALS
    # Receiving the signals here, for the whole run, keeps a second Ctrl-C during the drain
    # from interrupting it halfway.
    with SignalQueue(*signums) as signals:
        if command:
            status = _run_application(command, signals)
        else:
            signals.receive()
            status = 0
        # Engine.drain releases the GIL; signals arriving meanwhile only wait in the queue.
        engine.drain(drain_timeout)
    return status


def exit_status(returncode: int) -> int:
    """A child's return code as a shell reports it: killed by signal N becomes 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def _run_application(command: Sequence[str], signals: SignalQueue) -> int:
    try:
        process = subprocess.Popen(list(command))
    except FileNotFoundError:
        _report(f"cannot start {command[0]}: command not found")
        return COMMAND_NOT_FOUND
    except PermissionError:
        _report(f"cannot start {command[0]}: permission denied")
        return COMMAND_NOT_EXECUTABLE
    except OSError as error:
        _report(f"cannot start {command[0]}: {error.strerror or error}")
        return COMMAND_NOT_EXECUTABLE
    # A SIGCHLD that came before poll() stays queued, so the wait below cannot miss the exit.
    while (returncode := process.poll()) is None:
        # Only SIGTERM is passed on. A Ctrl-C in a terminal reaches the application by itself,
        # since it shares meshctl's process group; passing SIGINT on too would deliver it twice.
        if signals.receive() == signal.SIGTERM:
            process.send_signal(signal.SIGTERM)
    return exit_status(returncode)


def _report(message: str) -> None:
    print(f"meshctl: {message}", file=sys.stderr, flush=True)
