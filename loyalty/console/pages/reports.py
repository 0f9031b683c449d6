"""Reports: the daily report over a range of UTC days as server-drawn SVG charts and a
table, and the same range as CSV."""

from __future__ import annotations

import csv
import io
from datetime import date, timedelta
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from loyalty.api.deps import Container, ContainerDep
from loyalty.application.commands.periods import ReportRange
from loyalty.application.reporting import (
    DAY_COLUMNS,
    FIGURE_LABELS,
    TODAY_FIGURES,
    ReportRangeError,
    check_range,
    daily_report,
)
from loyalty.console.auth import SessionDep
from loyalty.console.forms import form_command
from loyalty.console.problems import ConsoleProblem
from loyalty.console.rendering import PREFIX, render

router = APIRouter()

REPORT_DAYS = 30
"""The range the reports page opens with (the last 30 UTC days)."""
CHART_WIDTH, CHART_HEIGHT = 720, 160
CHARTS: list[tuple[str, str, str]] = [
    ("events", FIGURE_LABELS["events"], "#0a4fa3"),
    ("currency_credited", FIGURE_LABELS["currency_credited"], "#1d6b2f"),
    ("currency_spent", FIGURE_LABELS["currency_spent"], "#a1120d"),
    ("outstanding_currency", FIGURE_LABELS["outstanding_currency"], "#13263f"),
]
REPORT_COLUMNS: tuple[str, ...] = (
    "day",
    *TODAY_FIGURES[:-1],
    "active_members",
    "new_members",
    "outstanding_currency",
)
"""The reports page's table: the dashboard's figures of today, for each day, and more."""
EXPORT_COLUMNS = list(DAY_COLUMNS)


def report_range(first: str, last: str, today: date) -> tuple[date, date]:
    """The page's range: ``from``/``to`` as given (YYYY-MM-DD, bounded days: see
    :class:`~loyalty.api.schemas.ReportRange`), else the last 30 days."""
    given = form_command(ReportRange, {"from": first, "to": last})
    end = given.to or today
    start = given.from_ or end - timedelta(days=REPORT_DAYS - 1)
    try:
        check_range(start, end)
    except ReportRangeError as exc:
        raise ConsoleProblem(422, "invalid_range", str(exc)) from None
    return start, end


def bars(days: list[dict[str, Any]], field: str) -> list[dict[str, Any]]:
    """One bar per day, scaled to the chart (SVG coordinates; server-drawn, no script)."""
    values = [float(d[field]) for d in days]
    top = max([*values, 1.0])
    width = CHART_WIDTH / max(1, len(values))
    return [
        {
            "x": round(i * width + width * 0.1, 2),
            "width": round(width * 0.8, 2),
            "height": round(CHART_HEIGHT * v / top, 2),
            "y": round(CHART_HEIGHT - CHART_HEIGHT * v / top, 2),
            "day": d["day"],
            "value": d[field],
        }
        for i, (d, v) in enumerate(zip(days, values, strict=True))
    ]


def report_days(container: Container, start: date, end: date) -> list[dict[str, Any]]:
    assert container.rollups is not None
    return [d.to_wire() for d in daily_report(container.rollups, start, end)]


@router.get("/reports")
async def reports_page(
    request: Request,
    container: ContainerDep,
    session: SessionDep,
    first: Annotated[str, Query(alias="from")] = "",
    last: Annotated[str, Query(alias="to")] = "",
) -> Response:
    start, end = report_range(first, last, container.clock().date())
    days = await run_in_threadpool(report_days, container, start, end)
    charts = [
        {
            "field": f,
            "title": t,
            "colour": c,
            "bars": bars(days, f),
            "top": max([0, *(d[f] for d in days)]),
        }
        for f, t, c in CHARTS
    ]
    return render(
        request,
        "reports.html",
        session=session,
        page="reports",
        start=start,
        end=end,
        days=days,
        charts=charts,
        columns=REPORT_COLUMNS,
        labels=FIGURE_LABELS,
        width=CHART_WIDTH,
        height=CHART_HEIGHT,
        export=f"{PREFIX}/reports/export.csv?" + urlencode({"from": start, "to": end}),
    )


@router.get("/reports/export.csv")
async def reports_export(
    container: ContainerDep,
    _session: SessionDep,
    first: Annotated[str, Query(alias="from")] = "",
    last: Annotated[str, Query(alias="to")] = "",
) -> Response:
    start, end = report_range(first, last, container.clock().date())
    days = await run_in_threadpool(report_days, container, start, end)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(EXPORT_COLUMNS)
    for d in days:
        writer.writerow([d[c] for c in EXPORT_COLUMNS])
    name = f"loyalty-daily-{start}-{end}.csv"
    return Response(
        out.getvalue(),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )
