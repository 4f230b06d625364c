"""Property tests of the engine's weighted picker, `meshctl._core.weighted_pick` (meshctl only)."""

from __future__ import annotations

import importlib
from itertools import accumulate

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.meshctl_only

U32_MAX = 2**32 - 1  # xDS weights are UInt32Value


def core():
    # Imported in the test, not at module level: a missing engine fails these tests, not collection.
    return importlib.import_module("meshctl._core")


def positive_sum(weights: list[int]) -> bool:
    return sum(weights) > 0


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 60), min_size=1, max_size=12).filter(positive_sum))
def test_every_draw_counts_exactly(weights):
    """Small weights: enumerate every draw; index i must be chosen exactly weights[i] times."""
    pick = core().weighted_pick
    counts = [0] * len(weights)
    for draw in range(sum(weights)):
        index = pick(weights, draw)
        assert 0 <= index < len(weights), (weights, draw, index)
        assert weights[index] > 0, f"draw {draw} picked index {index} whose weight is 0: {weights}"
        counts[index] += 1
    assert counts == weights


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, U32_MAX), min_size=1, max_size=20).filter(positive_sum), st.data())
def test_boundaries_with_large_weights(weights, data):
    """Large weights: each positive-weight index owns exactly [start, end) of the draw space.

    The draw space is laid out in index order, as Envoy lays out weighted_clusters, so the same
    draw picks the same cluster on both. Checking both ends of every interval (and the draws just
    outside it) pins each interval's size to its weight exactly, without enumerating 2**36 draws.
    """
    pick = core().weighted_pick
    ends = list(accumulate(weights))
    starts = [end - weight for end, weight in zip(ends, weights)]
    total = ends[-1]
    for index, (start, end) in enumerate(zip(starts, ends)):
        if weights[index] == 0:
            continue
        assert pick(weights, start) == index, (weights, start)
        assert pick(weights, end - 1) == index, (weights, end - 1)
        if start > 0:
            assert pick(weights, start - 1) < index, (weights, start - 1)
        if end < total:
            assert pick(weights, end) > index, (weights, end)
        inside = data.draw(st.integers(start, end - 1), label=f"draw inside index {index}")
        assert pick(weights, inside) == index, (weights, inside)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 1000), min_size=1, max_size=30).filter(positive_sum))
def test_picker_is_monotonic_and_skips_zero_weights(weights):
    """Draws in increasing order never pick a lower index, and never a zero-weight one."""
    pick = core().weighted_pick
    total = sum(weights)
    step = max(1, total // 500)
    previous = -1
    for draw in list(range(0, total, step)) + [total - 1]:
        index = pick(weights, draw)
        assert weights[index] > 0 and index >= previous, (weights, draw, index, previous)
        previous = index
