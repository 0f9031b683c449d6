"""Reports: the daily report over a range of UTC days as charts (matplotlib, drawn on
the server as inline SVG, the same code as ``loyalty report``'s PNG) and a table, and
the same range as CSV."""

from __future__ import annotations

import csv
import io
from datetime import date, timedelta
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request, Response
from markupsafe import Markup
from starlette.concurrency import run_in_threadpool

from loyalty.api.deps import Container, ContainerDep
from loyalty.application.commands.periods import ReportRange
from loyalty.application.reporting import (
    DAY_COLUMNS,
    FIGURE_LABELS,
    TODAY_FIGURES,
    DayReport,
    ReportRangeError,
    check_range,
    daily_report,
)
from loyalty.console.auth import SessionDep
from loyalty.console.forms import form_command
from loyalty.console.problems import ConsoleProblem
from loyalty.console.rendering import PREFIX, render
from loyalty.report import PANELS, data_days, no_data_note, panel_svg

router = APIRouter()

REPORT_DAYS = 30
"""The range the reports page opens with (the last 30 UTC days)."""
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


def report_days(container: Container, start: date, end: date) -> list[DayReport]:
    assert container.rollups is not None
    return daily_report(container.rollups, start, end)


def report_charts(days: list[DayReport]) -> dict[str, Any]:
    """The page's charts (the PNG's panels of ``loyalty report``, each an inline SVG:
    axes with dates and values, each its own scale) over the days from the first one
    with data, what they leave out, and the table's rows (the same days)."""
    shown = data_days(days)
    return {
        "charts": [
            {"field": p.field, "title": p.title, "svg": Markup(panel_svg(p, shown))}
            for p in (PANELS if shown else ())
        ],
        "no_data": no_data_note(days, shown),
        "days": [d.to_wire() for d in shown],
    }


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
    drawn = await run_in_threadpool(report_charts, days)
    return render(
        request,
        "reports.html",
        session=session,
        page="reports",
        start=start,
        end=end,
        columns=REPORT_COLUMNS,
        labels=FIGURE_LABELS,
        **drawn,
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
    days = [d.to_wire() for d in await run_in_threadpool(report_days, container, start, end)]
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
