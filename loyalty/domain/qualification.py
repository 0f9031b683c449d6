"""Rank qualification periods: ranks by rank points earned recently. Pure; no clock.

A member's rank points are kept per UTC day earned (``"YYYY-MM-DD"``). Under a
:class:`RankQualification`, the rank on day D is the highest whose threshold is met by

- ``calendar_year``: the points earned from 1 January of D's year through D, or — until
  ``grace_days`` after the year began — the points of the whole previous year;
- ``{"rolling_days": N}``: the points of the N days ending on any day of
  [D - grace_days, D] (a rank is kept for the grace after the window drops below it).

Only days up to :data:`KEEP_DAYS` before the newest are kept on the account (bounded
state); every period the rules allow fits in them.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Final

MAX_ROLLING_DAYS: Final = 730
MAX_GRACE_DAYS: Final = 365
KEEP_DAYS: Final = MAX_ROLLING_DAYS + MAX_GRACE_DAYS + 400
"""Days of rank points kept before the newest (older ones can no longer count)."""


@dataclass(frozen=True)
class RankQualification:
    """``rolling_days`` None: calendar years."""

    rolling_days: int | None = None
    grace_days: int = 0

    def period_points(self, days: Mapping[str, int], day: date) -> int:
        """Rank points of the period ending on ``day`` (this year so far; the window)."""
        index = _Index(days)
        if self.rolling_days is None:
            return index.between(date(day.year, 1, 1), day)
        return index.between(day - timedelta(days=self.rolling_days - 1), day)

    def qualifying_points(self, days: Mapping[str, int], day: date) -> int:
        """The points the rank on ``day`` is judged by (the grace included)."""
        index = _Index(days)
        if self.rolling_days is None:
            start = date(day.year, 1, 1)
            points = index.between(start, day)
            if day < start + timedelta(days=self.grace_days):
                points = max(points, index.between(date(day.year - 1, 1, 1), start - timedelta(1)))
            return points
        span = timedelta(days=self.rolling_days - 1)
        return max(
            index.between(d - span, d)
            for d in (day - timedelta(days=k) for k in range(self.grace_days + 1))
        )

    def valid_until(self, days: Mapping[str, int], day: date, threshold: int) -> date | None:
        """The last day the points earned up to ``day`` keep a rank of ``threshold``
        (None: they do not reach it on ``day``)."""
        if threshold <= 0:
            return None
        if self.qualifying_points(days, day) < threshold:
            return None
        index = _Index(days)
        if self.rolling_days is None:
            if index.between(date(day.year, 1, 1), day) >= threshold:
                end = date(day.year, 12, 31)
            else:  # kept from last year through the grace
                end = date(day.year, 1, 1) - timedelta(days=1)
            return end + timedelta(days=self.grace_days)
        span = timedelta(days=self.rolling_days - 1)
        last = day
        # the window's sum only falls as days leave it: the last day it still holds
        while index.between(last + timedelta(days=1) - span, last + timedelta(days=1)) >= threshold:
            last += timedelta(days=1)
        return last + timedelta(days=self.grace_days)


class _Index:
    """Prefix sums over the day buckets for range sums in O(log n)."""

    def __init__(self, days: Mapping[str, int]) -> None:
        ordered = sorted((date.fromisoformat(k).toordinal(), v) for k, v in days.items())
        self.keys = [k for k, _ in ordered]
        self.sums = [0]
        for _, v in ordered:
            self.sums.append(self.sums[-1] + v)

    def between(self, first: date, last: date) -> int:
        """Points of the days in [first, last]."""
        lo = bisect.bisect_left(self.keys, first.toordinal())
        hi = bisect.bisect_right(self.keys, last.toordinal())
        return self.sums[hi] - self.sums[lo] if hi > lo else 0


def rank_index(thresholds: Sequence[int], points: int) -> int:
    """Index of the highest threshold met by ``points`` (-1: none)."""
    return bisect.bisect_right(list(thresholds), points) - 1


def prune(days: dict[str, int], newest: str) -> None:
    """Drop day buckets older than :data:`KEEP_DAYS` before ``newest``."""
    limit = (date.fromisoformat(newest) - timedelta(days=KEEP_DAYS)).isoformat()
    for key in [k for k in days if k < limit]:
        del days[key]
