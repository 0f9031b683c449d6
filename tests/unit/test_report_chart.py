"""The report chart: every bar sits on its day's tick, in every panel, and the
outstanding currency is drawn as a line."""

from __future__ import annotations

from datetime import date, timedelta
from decimal import Decimal

import pytest
from matplotlib.patches import Rectangle

from loyalty.application.reporting import AccountDay, ActivityRow, DayReport
from loyalty.report import build_chart


def day(first: date, i: int) -> DayReport:
    return DayReport(
        day=first + timedelta(days=i),
        activity=[
            ActivityRow("web", "logged_on", 10 * (i + 1), 5, 3, Decimal(5), Decimal(5)),
            ActivityRow("web", "played_game", 5 * i, 5 * i, 2, Decimal("12.5"), Decimal(10)),
        ],
        active_members=3 + i,
        changes=AccountDay(currency_credited=50 + i, currency_spent=7),
        outstanding_currency=100 + 43 * i,
        members=5,
        members_with_balance=4,
        members_per_rank={"bronze": 5},
    )


@pytest.mark.parametrize("n_days", [1, 3, 7])
def test_every_bar_is_centred_on_its_day_tick(n_days: int) -> None:
    first = date(2026, 11, 23)
    days = [day(first, i) for i in range(n_days)]
    fig = build_chart(days)
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
    assert panels_with_bars == 2  # events by type, currency
    assert [t.get_text() for t in fig.axes[2].get_xticklabels()] == labels


def test_the_outstanding_currency_is_a_line_of_its_own() -> None:
    days = [day(date(2026, 11, 23), i) for i in range(4)]
    lines = [
        line
        for ax in build_chart(days).axes
        for line in ax.get_lines()
        if line.get_label() == "outstanding"
    ]
    assert len(lines) == 1
    assert list(lines[0].get_ydata()) == [d.outstanding_currency for d in days]
