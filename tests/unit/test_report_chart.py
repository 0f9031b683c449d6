"""The report chart: every bar sits on its day's tick, in every panel."""

from __future__ import annotations

from datetime import date, timedelta

import pytest
from matplotlib.patches import Rectangle

from loyalty.report import DayStats, Report, build_chart


@pytest.mark.parametrize("n_days", [1, 3, 7])
def test_every_bar_is_centred_on_its_day_tick(n_days: int) -> None:
    first = date(2026, 11, 23)
    days = [
        DayStats(
            day=first + timedelta(days=i),
            events_by_type={"logged_on": 10 * (i + 1), "played_game": 5 * i},
            active_members=3 + i,
            awards=2,
            members_awarded=2,
            currency_issued=50 + i,
            currency_spent=7,
        )
        for i in range(n_days)
    ]
    fig = build_chart(Report(first, days[-1].day, days))
    labels = [d.day.strftime("%m-%d") for d in days]
    panels_with_bars = 0
    for ax in fig.axes:
        ticks = list(ax.get_xticks())
        assert ticks == list(range(n_days))
        bars = [p for p in ax.patches if isinstance(p, Rectangle)]
        for bar in bars:
            centre = bar.get_x() + bar.get_width() / 2
            assert min(abs(centre - t) for t in ticks) < 1e-9, (ax.get_title(), centre, ticks)
        panels_with_bars += bool(bars)
    assert panels_with_bars == 2  # ingress by type, currency
    assert [t.get_text() for t in fig.axes[-1].get_xticklabels()] == labels
