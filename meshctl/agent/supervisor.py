"""Supervises the application beside a running engine: forwards SIGTERM, then drains the engine."""

import signal
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

import trio

# The exit statuses a shell gives when a command cannot be run, so scripts can tell them apart.
COMMAND_NOT_FOUND = 127
COMMAND_NOT_EXECUTABLE = 126


class Drainable(Protocol):
    """What supervision needs of meshctl._core.Engine."""

    def drain(self, timeout: float = 5.0) -> None: ...


async def serve(engine: Drainable, command: Sequence[str] | None, drain_timeout: float) -> int:
    """Wait for `command` to exit (without one: for SIGTERM or SIGINT), then drain `engine`.

    The engine is already serving, so the application starts with its sidecar ready. Returns
    meshctl's exit status: the application's, as a shell would report it, or 0 without one.
    """
    # Receiving the signals here, for the whole run, keeps a second Ctrl-C during the drain
    # from interrupting it halfway.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        if command:
            status = await _run_application(command, signals)
        else:
            async for _ in signals:
                break
            status = 0
        # Engine.drain releases the GIL; a thread keeps trio's loop free to take signals meanwhile.
        await trio.to_thread.run_sync(engine.drain, drain_timeout)
    return status


def exit_status(returncode: int) -> int:
    """A child's return code as a shell reports it: killed by signal N becomes 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


async def _run_application(command: Sequence[str], signals: AsyncIterator[int]) -> int:
    try:
        process = await trio.lowlevel.open_process(list(command))
    except FileNotFoundError:
        _report(f"cannot start {command[0]}: command not found")
        return COMMAND_NOT_FOUND
    except PermissionError:
        _report(f"cannot start {command[0]}: permission denied")
        return COMMAND_NOT_EXECUTABLE
    except OSError as error:
        _report(f"cannot start {command[0]}: {error.strerror or error}")
        return COMMAND_NOT_EXECUTABLE
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_forward_sigterm, signals, process)
        returncode = await process.wait()
        nursery.cancel_scope.cancel()
    return exit_status(returncode)


async def _forward_sigterm(signals: AsyncIterator[int], process: trio.Process) -> None:
    async for signum in signals:
        # Only SIGTERM is passed on. A Ctrl-C in a terminal reaches the application by itself,
        # since it shares meshctl's process group; passing SIGINT on too would deliver it twice.
        if signum == signal.SIGTERM:
            process.send_signal(signal.SIGTERM)


def _report(message: str) -> None:
    print(f"meshctl: {message}", file=sys.stderr, flush=True)
