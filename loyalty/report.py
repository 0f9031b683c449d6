"""``loyalty report``: the daily report (``loyalty.application.reporting``), from the
rollups, so a past day reads the same after retention dropped its activity. Rendered as
a rich table and as a PNG chart (matplotlib, Agg, no display needed).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

from rich.table import Table

from loyalty.application.reporting import DayReport

MAX_TYPE_COLUMNS = 6
OTHER = "other"


def events_by_type(day: DayReport) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for row in day.activity:
        out[row.event_type] += row.events
    return dict(out)


def type_columns(days: Sequence[DayReport]) -> list[str]:
    """The event types shown: the most frequent few, the rest as ``other``."""
    totals: dict[str, int] = defaultdict(int)
    for d in days:
        for event_type, n in events_by_type(d).items():
            totals[event_type] += n
    types = sorted(totals, key=lambda t: (-totals[t], t))
    if len(types) <= MAX_TYPE_COLUMNS:
        return types
    return [*types[: MAX_TYPE_COLUMNS - 1], OTHER]


def by_column(columns: Sequence[str], day: DayReport) -> dict[str, int]:
    out = dict.fromkeys(columns, 0)
    for event_type, n in events_by_type(day).items():
        out[event_type if event_type in out else OTHER] += n
    return out


def _amount(value: Decimal) -> str:
    whole = value.to_integral_value()
    return f"{int(whole):,}" if value == whole else f"{value:,.2f}"


def render_table(days: Sequence[DayReport]) -> Table:
    columns = type_columns(days)
    first, last = (days[0].day, days[-1].day) if days else (None, None)
    table = Table(
        title=f"loyalty, {first} to {last} (UTC days)",
        title_justify="left",
        caption="active: members with activity (estimate); earning: events that earned; "
        "awarded: exact currency of the day's events; credited, spent, refunded: on accounts; "
        "outstanding: currency on all accounts at the end of the day; holders: members with "
        "a balance",
        caption_justify="left",
    )
    table.add_column("day")
    for name in columns:
        table.add_column(name, justify="right")
    headings = (
        "events",
        "active",
        "earning",
        "awarded",
        "credited",
        "spent",
        "refunded",
        "outstanding",
        "holders",
    )
    for name in headings:
        table.add_column(name, justify="right")
    totals: dict[str, int] = defaultdict(int)
    awarded = Decimal(0)
    for d in days:
        cells = by_column(columns, d)
        c = d.changes
        table.add_row(
            d.day.isoformat(),
            *(f"{cells[k]:,}" for k in columns),
            f"{d.events:,}",
            f"{d.active_members:,}",
            f"{d.earning_events:,}",
            _amount(d.currency_awarded),
            f"{c.currency_credited:,}",
            f"{c.currency_spent:,}",
            f"{c.currency_refunded:,}",
            f"{d.outstanding_currency:,}",
            f"{d.members_with_balance:,}",
        )
        for k in columns:
            totals[k] += cells[k]
        totals["events"] += d.events
        totals["earning"] += d.earning_events
        totals["credited"] += c.currency_credited
        totals["spent"] += c.currency_spent
        totals["refunded"] += c.currency_refunded
        awarded += d.currency_awarded
    table.add_section()
    table.add_row(
        "total",
        *(f"{totals[k]:,}" for k in columns),
        f"{totals['events']:,}",
        "",
        f"{totals['earning']:,}",
        _amount(awarded),
        f"{totals['credited']:,}",
        f"{totals['spent']:,}",
        f"{totals['refunded']:,}",
        f"{days[-1].outstanding_currency:,}" if days else "",
        "",
        style="bold",
    )
    unweighed: dict[str, int] = defaultdict(int)
    for d in days:
        for event_type, count in d.unweighed_types.items():
            unweighed[event_type] += count
    if unweighed:  # issue 32 item 2: accepted, earning nothing under the current rules
        listed = ", ".join(f"{t} {n:,}" for t, n in sorted(unweighed.items()))
        table.caption = f"{table.caption}\nunweighed types (no current rule weighs them): {listed}"
    return table


def build_chart(days: Sequence[DayReport]) -> Any:
    """The chart as a matplotlib ``Figure``: three panels sharing one x axis with a tick
    per day, every bar centred on its day's tick. Events by type (stacked); currency
    credited (up) and spent (down) with the outstanding currency as a line (its own
    axis); active members and members with a balance."""
    from matplotlib.figure import Figure  # heavy: only when a chart is wanted

    labels = [d.day.strftime("%m-%d") for d in days]
    xs = list(range(len(labels)))
    columns = type_columns(days)
    fig = Figure(figsize=(10, 9), layout="constrained")
    ingress_ax, currency_ax, members_ax = fig.subplots(3, 1, sharex=True)

    bottoms = [0] * len(xs)
    for name in columns:
        heights = [by_column(columns, d)[name] for d in days]
        ingress_ax.bar(xs, heights, width=0.6, bottom=bottoms, align="center", label=name)
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    ingress_ax.set_title("events by type")
    ingress_ax.set_ylabel("events")
    if columns:
        ingress_ax.legend(loc="upper left", fontsize="small")

    currency_ax.bar(
        xs, [d.changes.currency_credited for d in days], 0.6, align="center", label="credited"
    )
    currency_ax.bar(
        xs, [-d.changes.currency_spent for d in days], 0.6, align="center", label="spent"
    )
    currency_ax.axhline(0, color="black", linewidth=0.8)
    currency_ax.set_title("currency credited (up), spent (down), outstanding (line)")
    outstanding_ax = currency_ax.twinx()
    outstanding_ax.plot(
        xs,
        [d.outstanding_currency for d in days],
        color="tab:red",
        marker="o",
        label="outstanding",
    )
    outstanding_ax.set_ylabel("outstanding")
    handles = currency_ax.get_legend_handles_labels()
    more = outstanding_ax.get_legend_handles_labels()
    currency_ax.legend(
        handles[0] + more[0], handles[1] + more[1], loc="upper left", fontsize="small"
    )

    members_ax.plot(xs, [d.active_members for d in days], marker="o", label="active")
    members_ax.plot(xs, [d.members_with_balance for d in days], marker=".", label="with a balance")
    members_ax.set_title("members")
    members_ax.legend(loc="upper left", fontsize="small")
    for ax in (ingress_ax, currency_ax, members_ax):
        ax.set_xticks(xs, labels)
        ax.tick_params(axis="x", labelbottom=ax is members_ax)
    if len(xs) > 10:  # dates side by side would overlap
        members_ax.tick_params(axis="x", labelrotation=60)
    members_ax.set_xlim(-0.5, len(xs) - 0.5)
    if days:
        fig.suptitle(f"loyalty, {days[0].day} to {days[-1].day}")
    return fig


def write_chart(days: Sequence[DayReport], path: Path) -> None:
    """The chart of :func:`build_chart` as a PNG file."""
    fig = build_chart(days)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
