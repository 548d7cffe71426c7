"""Budget periods: a budget's spend starts again at 00:00 UTC each day, each Monday, each first of the
month, or never (``total``). Times are Unix seconds; the wall clock is whatever the caller passes in
(``time.time`` in the gateway, a clock driven by trio's MockClock in tests)."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

__all__ = ["PERIODS", "iso", "period_bounds"]

PERIODS = ("day", "week", "month", "total")


def period_bounds(period: str, wall: float) -> tuple[float, float]:
    """(start, reset) of the period ``wall`` falls in: ``start <= wall < reset``; ``total`` is (0, inf)."""
    if period == "total":
        return 0.0, math.inf
    day = datetime.fromtimestamp(wall, timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        start, reset = day, day + timedelta(days=1)
    elif period == "week":
        start = day - timedelta(days=day.weekday())
        reset = start + timedelta(days=7)
    elif period == "month":
        start = day.replace(day=1)
        reset = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    else:
        raise ValueError(f"unknown budget period {period!r}; one of {', '.join(PERIODS)}")
    return start.timestamp(), reset.timestamp()


def iso(t: float | None) -> str | None:
    """``t`` as ISO 8601 UTC (``2025-01-31T00:00:00Z``); None for None or never."""
    if t is None or not math.isfinite(t):
        return None
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
