"""The percentile every benchmark reports (no dependencies: the engine benchmark runs where aiohttp is absent)."""

from __future__ import annotations


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile of ``values`` by nearest rank (the sample at index round(q/100 * (n-1)) of the sorted
    values), or None when there are none. Under 100 samples a 99th percentile is the largest or second largest."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]
