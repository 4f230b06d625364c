"""Queues received signals on a pipe, so a blocking wait for the next one cannot miss it."""

import os
import signal
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any, Self

# What signal.signal takes and returns: a function, SIG_DFL or SIG_IGN, or None for a handler
# installed outside Python.
_Handler = Callable[[int, FrameType | None], Any] | int | None


class SignalQueue:
    """While entered, the given signals no longer take their default action; `receive` returns them.

    Python runs signal handlers between bytecodes, so a handler that sets a flag races with any
    wait for that flag. signal.set_wakeup_fd instead has the C-level handler write the signal's
    number to a pipe at once, and a blocking read of that pipe wakes for it even if the signal
    came first. Must be entered from the main thread, as Python only takes signals there.
    """

    def __init__(self, *signums: int) -> None:
        self._signums = frozenset(signums)
        self._previous_handlers: dict[int, _Handler] = {}
        self._previous_wakeup_fd = -1
        self._read_fd = self._write_fd = -1

    def __enter__(self) -> Self:
        self._read_fd, self._write_fd = os.pipe()
        # set_wakeup_fd needs a write end that never blocks inside a signal handler.
        os.set_blocking(self._write_fd, False)
        self._previous_wakeup_fd = signal.set_wakeup_fd(self._write_fd)
        for signum in self._signums:
            # The wakeup fd only hears of signals that have a Python handler; this one does nothing
            # more, and keeps SIGTERM from killing meshctl and SIGINT from raising KeyboardInterrupt.
            self._previous_handlers[signum] = signal.signal(signum, _queued_only)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for signum, handler in self._previous_handlers.items():
            # Python cannot reinstate a handler it did not install; the default is the closest.
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        signal.set_wakeup_fd(self._previous_wakeup_fd)
        os.close(self._read_fd)
        os.close(self._write_fd)

    def receive(self) -> int:
        """Block until one of the queue's signals arrives (or had arrived unread), and return it."""
        while True:
            # The pipe also carries signals other code installed Python handlers for; skip those.
            signum = os.read(self._read_fd, 1)[0]
            if signum in self._signums:
                return signum


def _queued_only(signum: int, frame: FrameType | None) -> None:
    pass
