"""``loyalty report``: daily operator statistics from our tables and read models.

Per UTC day: ingress events by type and active members (distinct users with activity,
from the ingress log, so only as far back as retention keeps it); awards, members
awarded, currency issued, spent and refunded (from the ``member_history`` read model).
Rendered as a rich table and as a PNG chart (matplotlib, Agg, no display needed).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from rich.table import Table

from loyalty.adapters.db import Database

MAX_TYPE_COLUMNS = 6
OTHER = "other"


@dataclass(slots=True)
class DayStats:
    day: date
    events_by_type: dict[str, int] = field(default_factory=dict)
    active_members: int = 0
    awards: int = 0
    members_awarded: int = 0
    currency_issued: int = 0
    currency_spent: int = 0
    currency_refunded: int = 0

    @property
    def events(self) -> int:
        return sum(self.events_by_type.values())


@dataclass(slots=True)
class Report:
    first_day: date
    last_day: date
    days: list[DayStats]

    @property
    def types(self) -> list[str]:
        """Event types, most frequent first."""
        totals: dict[str, int] = defaultdict(int)
        for d in self.days:
            for event_type, n in d.events_by_type.items():
                totals[event_type] += n
        return sorted(totals, key=lambda t: (-totals[t], t))

    def columns(self) -> list[str]:
        """The type columns shown: the most frequent few, the rest as ``other``."""
        types = self.types
        if len(types) <= MAX_TYPE_COLUMNS:
            return types
        return [*types[: MAX_TYPE_COLUMNS - 1], OTHER]

    def by_column(self, day: DayStats) -> dict[str, int]:
        shown = self.columns()
        out = dict.fromkeys(shown, 0)
        for event_type, n in day.events_by_type.items():
            out[event_type if event_type in out else OTHER] += n
        return out


def _day_expr(db: Database, column: str) -> str:
    if db.backend == "postgresql":
        return f"(({column}) AT TIME ZONE 'UTC')::date"
    return f"substr({column}, 1, 10)"  # ISO text on SQLite (both 'T' and ' ' forms)


def _since_param(db: Database, first_day: date) -> Any:
    if db.backend == "postgresql":
        return datetime(first_day.year, first_day.month, first_day.day, tzinfo=UTC)
    return first_day.isoformat()  # ISO text compares in time order


def _as_date(value: Any) -> date:
    return value if isinstance(value, date) else date.fromisoformat(str(value))


def collect(db: Database, days: int, today: date | None = None) -> Report:
    """Statistics for the ``days`` UTC days ending with ``today`` (inclusive)."""
    if days < 1:
        raise ValueError("days must be >= 1")
    last = today or datetime.now(UTC).date()
    first = last - timedelta(days=days - 1)
    stats = {first + timedelta(days=i): DayStats(first + timedelta(days=i)) for i in range(days)}
    since = _since_param(db, first)
    ingress_day = _day_expr(db, "occurred_at")
    history_day = _day_expr(db, "at")
    with db.read() as conn:
        by_type = conn.execute(
            sa.text(
                f"SELECT {ingress_day} AS day, type, count(*) FROM ingress_events "
                "WHERE occurred_at >= :since GROUP BY 1, 2"
            ),
            {"since": since},
        ).all()
        active = conn.execute(
            sa.text(
                f"SELECT {ingress_day} AS day, count(DISTINCT user_id) FROM ingress_events "
                "WHERE occurred_at >= :since GROUP BY 1"
            ),
            {"since": since},
        ).all()
        history = conn.execute(
            sa.text(
                f"SELECT {history_day} AS day, kind, count(*), coalesce(sum(currency), 0), "
                "count(DISTINCT user_id) FROM member_history WHERE at >= :since GROUP BY 1, 2"
            ),
            {"since": since},
        ).all()
    for day, event_type, n in by_type:
        if (entry := stats.get(_as_date(day))) is not None:
            entry.events_by_type[str(event_type)] = int(n)
    for day, n in active:
        if (entry := stats.get(_as_date(day))) is not None:
            entry.active_members = int(n)
    for day, kind, n, currency, members in history:
        entry = stats.get(_as_date(day))
        if entry is None:
            continue
        if kind == "award":
            entry.awards = int(n)
            entry.members_awarded = int(members)
            entry.currency_issued += int(currency)
        elif kind == "spend":
            entry.currency_spent = -int(currency)
        elif kind == "refund":
            entry.currency_refunded = int(currency)
    return Report(first, last, [stats[d] for d in sorted(stats)])


def render_table(report: Report) -> Table:
    columns = report.columns()
    table = Table(
        title=f"loyalty, {report.first_day} to {report.last_day} (UTC days)",
        title_justify="left",
        caption="active: members with activity; awarded: members awarded; currency issued "
        "(awards), spent (orders) and refunded",
        caption_justify="left",
    )
    table.add_column("day")
    for name in columns:
        table.add_column(name, justify="right")
    for name in ("events", "active", "awards", "awarded", "issued", "spent", "refunded"):
        table.add_column(name, justify="right")
    totals = DayStats(report.last_day)
    for d in report.days:
        cells = report.by_column(d)
        table.add_row(
            d.day.isoformat(),
            *(f"{cells[c]:,}" for c in columns),
            f"{d.events:,}",
            f"{d.active_members:,}",
            f"{d.awards:,}",
            f"{d.members_awarded:,}",
            f"{d.currency_issued:,}",
            f"{d.currency_spent:,}",
            f"{d.currency_refunded:,}",
        )
        for event_type, n in d.events_by_type.items():
            totals.events_by_type[event_type] = totals.events_by_type.get(event_type, 0) + n
        totals.awards += d.awards
        totals.currency_issued += d.currency_issued
        totals.currency_spent += d.currency_spent
        totals.currency_refunded += d.currency_refunded
    total_cells = report.by_column(totals)
    table.add_section()
    table.add_row(
        "total",
        *(f"{total_cells[c]:,}" for c in columns),
        f"{totals.events:,}",
        "",
        f"{totals.awards:,}",
        "",
        f"{totals.currency_issued:,}",
        f"{totals.currency_spent:,}",
        f"{totals.currency_refunded:,}",
        style="bold",
    )
    return table


def build_chart(report: Report) -> Any:
    """The chart as a matplotlib ``Figure``: three panels sharing one x axis with a tick
    per day, every bar centred on its day's tick. Ingress events by type (stacked);
    currency issued (up) and spent (down) on the same tick; members and awards."""
    from matplotlib.figure import Figure  # heavy: only when a chart is wanted

    labels = [d.day.strftime("%m-%d") for d in report.days]
    xs = list(range(len(labels)))
    fig = Figure(figsize=(10, 9), layout="constrained")
    ingress_ax, currency_ax, members_ax = fig.subplots(3, 1, sharex=True)

    bottoms = [0] * len(xs)
    for name in report.columns():
        heights = [report.by_column(d)[name] for d in report.days]
        ingress_ax.bar(xs, heights, width=0.6, bottom=bottoms, align="center", label=name)
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    ingress_ax.set_title("ingress events by type")
    ingress_ax.set_ylabel("events")
    if report.columns():
        ingress_ax.legend(loc="upper left", fontsize="small")

    currency_ax.bar(
        xs, [d.currency_issued for d in report.days], 0.6, align="center", label="issued"
    )
    currency_ax.bar(
        xs, [-d.currency_spent for d in report.days], 0.6, align="center", label="spent"
    )
    currency_ax.axhline(0, color="black", linewidth=0.8)
    currency_ax.set_title("currency issued (up) and spent (down)")
    currency_ax.legend(loc="upper left", fontsize="small")

    members_ax.plot(xs, [d.active_members for d in report.days], marker="o", label="active")
    members_ax.plot(xs, [d.members_awarded for d in report.days], marker="o", label="awarded")
    members_ax.plot(xs, [d.awards for d in report.days], marker=".", linestyle="--", label="awards")
    members_ax.set_title("members and awards")
    members_ax.legend(loc="upper left", fontsize="small")
    for ax in (ingress_ax, currency_ax, members_ax):
        ax.set_xticks(xs, labels)
        ax.tick_params(axis="x", labelbottom=ax is members_ax)
    members_ax.set_xlim(-0.5, len(xs) - 0.5)
    fig.suptitle(f"loyalty, {report.first_day} to {report.last_day}")
    return fig


def write_chart(report: Report, path: Path) -> None:
    """The chart of :func:`build_chart` as a PNG file."""
    fig = build_chart(report)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
