"""Exponential backoff with jitter for reconnecting to the control plane."""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    """Delays that double from `base` up to `maximum`, each drawn from the upper half of its range.

    The jitter spreads a fleet of sidecars that lost the same control plane at the same moment;
    keeping the lower half out means no sidecar retries in a tight loop.
    """

    def __init__(self, base: float = 0.5, maximum: float = 30.0, random_fraction: Callable[[], float] = random.random) -> None:
        if not 0 < base <= maximum:
            raise ValueError(f"backoff needs 0 < base <= maximum, got base={base} maximum={maximum}")
        self.base = base
        self.maximum = maximum
        self._random_fraction = random_fraction
        self._attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self.maximum, self.base * 2 ** min(self._attempt, 32))
        self._attempt += 1
        return ceiling / 2 + self._random_fraction() * ceiling / 2

    def reset(self) -> None:
        """Start again from `base` (after a connection that worked)."""
        self._attempt = 0
