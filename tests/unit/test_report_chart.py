"""The report chart: every bar sits on its day's tick, in every panel, and the
outstanding currency is drawn as a line; days before the data are not drawn as zeros;
each panel has its own scale; the console's SVG of a panel is fit to inline under a
strict CSP."""

from __future__ import annotations

import re
from datetime import date, timedelta
from decimal import Decimal

import pytest
from matplotlib.patches import Rectangle

from loyalty.application.reporting import AccountDay, ActivityRow, DayReport
from loyalty.report import PANELS, build_chart, data_days, no_data_note, panel_svg


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
    labels = [d.day.strftime("%b %d") for d in days]
    panels_with_bars = 0
    for ax in fig.axes:
        ticks = list(ax.get_xticks())
        assert ticks == list(range(n_days))
        bars = [p for p in ax.patches if isinstance(p, Rectangle)]
        for bar in bars:
            centre = bar.get_x() + bar.get_width() / 2
            assert min(abs(centre - t) for t in ticks) < 1e-9, (ax.get_title(), centre, ticks)
        panels_with_bars += bool(bars)
    assert panels_with_bars == 3  # events by type, currency credited, currency spent
    assert [t.get_text() for t in fig.axes[-1].get_xticklabels()] == labels


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


def empty(d: date) -> DayReport:
    return DayReport(d, [], 0, AccountDay(), 0, 0, 0, {})


def test_days_before_the_first_data_are_no_data_not_zeros() -> None:
    first = date(2026, 11, 5)
    days = [empty(first + timedelta(days=i)) for i in range(29)]
    days.append(day(first, 29))
    shown = data_days(days)
    assert [d.day for d in shown] == [date(2026, 12, 4)]
    assert no_data_note(days, shown) == (
        "No data from 2026-11-05 to 2026-12-03: the charts start at 2026-12-04."
    )
    fig = build_chart(days)
    assert "No data from 2026-11-05" in fig.get_suptitle()
    for ax in fig.axes:
        assert list(ax.get_xticks()) == [0]  # one day drawn, not thirty
    assert [t.get_text() for t in fig.axes[-1].get_xticklabels()] == ["Dec 04"]
    assert data_days([empty(first)]) == [] and no_data_note([empty(first)], []) == (
        "No data from 2026-11-05 to 2026-11-05."
    )


def test_a_small_series_has_its_own_scale_and_its_values_as_labels() -> None:
    d = day(date(2026, 12, 4), 0)
    d = DayReport(
        d.day,
        d.activity,
        d.active_members,
        AccountDay(currency_credited=5277, currency_spent=48),
        5229,
        5,
        4,
        {},
    )
    fig = build_chart([d])
    axes = {ax.get_title(loc="left"): ax for ax in fig.axes}
    spent = axes["Currency spent per day"]
    credited = axes["Currency credited per day"]
    assert spent.get_ylim()[1] < 100 < 5277 < credited.get_ylim()[1]
    assert "48" in [t.get_text() for t in spent.texts]
    assert "5,277" in [t.get_text() for t in credited.texts]
    ticks = [t.get_text() for t in credited.get_yticklabels()]
    assert any("," in t for t in ticks), ticks  # thousands separators on the axis


def test_a_panels_svg_inlines_under_a_strict_csp_with_its_text_as_text() -> None:
    days = [day(date(2026, 11, 23), i) for i in range(3)]
    svgs = [panel_svg(p, days) for p in PANELS]
    for svg in svgs:
        assert svg.startswith("<svg") and svg.endswith("</svg>")
        assert "<style" not in svg and " style=" not in svg and "<script" not in svg
        assert "<metadata" not in svg and 'id="figure_1"' not in svg
        assert "Nov 23" in svg and "Nov 25" in svg  # dates, as text
    assert ">52<" in svg_text(svgs[1])  # currency credited on Nov 25, as a label
    ids = [i for svg in svgs for i in re.findall(r' id="([^"]+)"', svg)]
    assert len(ids) == len(set(ids))  # several charts share a page


def svg_text(svg: str) -> str:
    return "".join(f">{t}<" for t in re.findall(r"<text[^>]*>([^<]*)</text>", svg))
