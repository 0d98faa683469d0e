"""The distribution-free interval of a median, for the rows that report a median of paired round ratios."""

from __future__ import annotations

import math


def median_interval(values, confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free interval for the median of `values`: the k-th smallest and k-th largest value,
    with k the largest rank at which the interval still covers the median with at least `confidence`.

    Each value falls below the median with probability 1/2, so the chance that fewer than k do is a
    binomial tail; with too few values for the confidence asked, the interval is the whole range.
    """
    ordered = sorted(float(value) for value in values)
    count = len(ordered)
    if not count:
        raise ValueError("no values")
    rank, tail = 1, 0.0
    while rank < (count + 1) // 2:
        tail += math.comb(count, rank - 1) / 2**count  # P(fewer than `rank` values below the median)
        if 2 * (tail + math.comb(count, rank) / 2**count) > 1 - confidence:
            break
        rank += 1
    return ordered[rank - 1], ordered[count - rank]
