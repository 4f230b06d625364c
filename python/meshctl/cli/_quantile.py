"""A quantile from cumulative histogram buckets, interpolated as Prometheus' histogram_quantile."""

from __future__ import annotations

import math
from collections.abc import Sequence


def histogram_quantile(quantile: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """The `quantile` (0..1) of observations counted in `buckets`: (upper bound, cumulative count)
    pairs, the last bound +Inf. None when there is nothing to estimate from.

    As Prometheus does: find the bucket holding the rank quantile × count and interpolate
    linearly inside it, from the bucket below's bound (0 for the first bucket, which assumes no
    negative observations) to its own. A rank in the +Inf bucket answers the highest finite
    bound, since the true value can be anything above it.
    """
    if math.isnan(quantile):
        return None
    ordered = sorted(buckets)
    if len(ordered) < 2 or not math.isinf(ordered[-1][0]):
        return None
    # Counts read at slightly different moments may dip; Prometheus evens them out the same way.
    cumulative, highest = [], 0.0
    for _, count in ordered:
        highest = max(highest, count)
        cumulative.append(highest)
    total = cumulative[-1]
    if total <= 0:
        return None
    if quantile < 0:
        return -math.inf
    if quantile > 1:
        return math.inf
    rank = quantile * total
    index = next(i for i, count in enumerate(cumulative) if count >= rank)
    if index == len(ordered) - 1:
        return ordered[-2][0]
    upper = ordered[index][0]
    if index == 0 and upper <= 0:
        return upper
    lower = 0.0 if index == 0 else ordered[index - 1][0]
    below = 0.0 if index == 0 else cumulative[index - 1]
    in_bucket = cumulative[index] - below
    if in_bucket == 0:  # only for quantile 0 over empty low buckets: the lowest possible value
        return lower
    return lower + (upper - lower) * (rank - below) / in_bucket
