"""``loyalty report``: the daily report (``loyalty.application.reporting``), from the
rollups, so a past day reads the same after retention dropped its activity. Rendered as
a rich table and as charts (matplotlib, Agg, no display needed): the panels of one PNG
for ``loyalty report --out``, and each panel as an inline SVG for the console's reports
page (the same drawing code).
"""

from __future__ import annotations

import re
import threading
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
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


@dataclass(frozen=True, slots=True)
class Panel:
    """One chart of the report: its own y scale, so a small series (spent 48) reads
    beside a large one (credited 5,277)."""

    field: str
    title: str
    unit: str
    kind: str  # "bars", "stacked" (events by type) or "lines"
    colour: str


PANELS: tuple[Panel, ...] = (
    Panel("events", "Events per day, by type", "events", "stacked", "#0a4fa3"),
    Panel("currency_credited", "Currency credited per day", "currency", "bars", "#1d6b2f"),
    Panel("currency_spent", "Currency spent per day", "currency", "bars", "#a1120d"),
    Panel(
        "outstanding_currency", "Outstanding currency (end of day)", "currency", "lines", "#13263f"
    ),
    Panel("members", "Members: active, with a balance", "members", "lines", "#6b3fa0"),
)
"""The report's charts, in order: the PNG of ``loyalty report`` draws them as the panels
of one figure, the console's reports page as one inline SVG each."""
VALUE_LABELS_UP_TO = 14
"""Bars carry their value as a label up to this many days (beyond, the y axis reads)."""


def has_data(day: DayReport) -> bool:
    """Anything recorded by the day: events, account changes, or accounts at all."""
    c = day.changes
    return bool(
        day.events
        or day.members
        or day.outstanding_currency
        or c.currency_credited
        or c.currency_spent
        or c.currency_refunded
        or c.currency_adjusted
        or c.new_members
    )


def data_days(days: Sequence[DayReport]) -> list[DayReport]:
    """The days from the first one with data (days before it are "no data": before the
    service was installed or anything happened; never drawn as zeros)."""
    for i, d in enumerate(days):
        if has_data(d):
            return list(days[i:])
    return []


def no_data_note(days: Sequence[DayReport], shown: Sequence[DayReport]) -> str | None:
    """What the charts leave out, in words (None: nothing)."""
    if not days:
        return None
    if not shown:
        return f"No data from {days[0].day} to {days[-1].day}."
    if shown[0].day > days[0].day:
        before = shown[0].day - timedelta(days=1)
        return f"No data from {days[0].day} to {before}: the charts start at {shown[0].day}."
    return None


def _series(panel: Panel, days: Sequence[DayReport]) -> dict[str, list[int]]:
    if panel.kind == "stacked":
        columns = type_columns(days)
        per_day = [by_column(columns, d) for d in days]
        return {name: [cells[name] for cells in per_day] for name in columns}
    if panel.field == "members":
        return {
            "active": [d.active_members for d in days],
            "with a balance": [d.members_with_balance for d in days],
        }
    if panel.field == "outstanding_currency":
        return {"outstanding": [d.outstanding_currency for d in days]}
    return {panel.field: [int(d.to_wire()[panel.field]) for d in days]}


def _thousands(value: float, _pos: int) -> str:
    return f"{value:,.0f}"


def draw_panel(
    ax: Any, panel: Panel, days: Sequence[DayReport], dates: bool = True, title: bool = True
) -> None:
    """``panel`` on ``ax``: a tick per day (at most ~10 labelled, as dates), values on
    the y axis with thousands separators, bars centred on their day's tick, and each
    bar's value when there are few days."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    xs = list(range(len(days)))
    series = _series(panel, days)
    if title:  # the console captions each chart in HTML instead
        ax.set_title(panel.title, loc="left", fontsize=11)
    ax.set_ylabel(panel.unit)
    if panel.kind == "lines":
        for i, (name, values) in enumerate(series.items()):
            colour = panel.colour if i == 0 else "#c25e00"
            ax.plot(xs, values, marker="o", markersize=3, color=colour, label=name)
            if values:
                ax.annotate(
                    f"{values[-1]:,}",
                    (xs[-1], values[-1]),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=9,
                    color=colour,
                )
        if len(series) > 1:
            ax.legend(loc="upper left", fontsize="small")
    else:
        bottoms = [0] * len(xs)
        palette = ["#0a4fa3", "#c25e00", "#1d6b2f", "#6b3fa0", "#a1120d", "#4a5260"]
        for i, (name, values) in enumerate(series.items()):
            colour = panel.colour if panel.kind == "bars" else palette[i % len(palette)]
            bars = ax.bar(
                xs, values, width=0.6, bottom=bottoms, align="center", label=name, color=colour
            )
            bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
            if panel.kind == "bars" and len(xs) <= VALUE_LABELS_UP_TO:
                ax.bar_label(bars, labels=[f"{v:,}" for v in values], fontsize=9, padding=2)
        if panel.kind == "stacked":
            if len(xs) <= VALUE_LABELS_UP_TO:
                for x, total in zip(xs, bottoms, strict=True):
                    ax.annotate(
                        f"{total:,}",
                        (x, total),
                        textcoords="offset points",
                        xytext=(0, 2),
                        ha="center",
                        fontsize=9,
                    )
            if series:
                ax.legend(loc="upper left", fontsize="small")
    if panel.kind == "stacked":
        top = max([0, *(sum(v) for v in zip(*series.values(), strict=True))])
    else:
        top = max([0, *(v for values in series.values() for v in values)])
    ax.set_ylim(0, top * 1.25 if top else 1)  # room for the value labels; 0 at the base
    ax.yaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
    ax.yaxis.set_major_formatter(FuncFormatter(_thousands))
    ax.grid(axis="y", color="#c9ced6", linewidth=0.6)
    ax.set_axisbelow(True)
    step = max(1, -(-len(xs) // 10))  # at most ~10 dates side by side
    ax.set_xticks(xs[::step], [d.day.strftime("%b %d") for d in days[::step]])
    if step > 1:
        ax.set_xticks(xs, minor=True)  # every day still has its tick
    pad = max(0.5, (7 - len(xs)) / 2)  # a day or two: bars of a week's width, centred
    ax.set_xlim(-pad, len(xs) - 1 + pad)
    ax.tick_params(axis="x", labelbottom=dates)
    if dates:
        first, last = days[0].day, days[-1].day
        ax.set_xlabel(f"UTC day, {first} to {last}" if first != last else f"UTC day, {first}")


def build_chart(days: Sequence[DayReport]) -> Any:
    """The report as a matplotlib ``Figure``: the panels of :data:`PANELS` one above the
    other, sharing a date axis that starts at the first day with data (the days before
    it are named in the title as "no data", not drawn as zeros), each with its own y
    scale."""
    from matplotlib.figure import Figure  # heavy: only when a chart is wanted

    shown = data_days(days)
    fig = Figure(figsize=(10, 2.3 * len(PANELS) + 0.6), layout="constrained")
    note = no_data_note(days, shown)
    title = f"loyalty, {days[0].day} to {days[-1].day} (UTC days)" if days else "loyalty"
    fig.suptitle(title + (f"\n{note}" if note else ""))
    if not shown:
        ax = fig.subplots()
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no data in this range", ha="center", va="center", fontsize=14)
        return fig
    axes = fig.subplots(len(PANELS), 1, sharex=True)
    for ax, panel in zip(axes, PANELS, strict=True):
        draw_panel(ax, panel, shown, dates=ax is axes[-1])
    return fig


def panel_svg(panel: Panel, days: Sequence[DayReport]) -> str:
    """One panel as an SVG element to inline in an HTML page under a strict CSP: the
    text as text (not paths: readable, searchable, accessible), matplotlib's inline
    ``style`` attributes turned into SVG presentation attributes (a CSP without
    ``unsafe-inline`` drops inline styles), no ``<style>``, no metadata, and only the
    ids something refers to (several charts share a page)."""
    import io

    from matplotlib import rc_context
    from matplotlib.figure import Figure

    with _RENDER, rc_context({"svg.fonttype": "none", "font.family": "DejaVu Sans"}):
        fig = Figure(figsize=(9.6, 2.2), layout="constrained")
        draw_panel(fig.subplots(), panel, days, title=False)
        out = io.StringIO()
        fig.savefig(out, format="svg", metadata={"Date": None})
    return inline_svg(out.getvalue())


_RENDER = threading.Lock()
"""matplotlib's rc parameters are global: one SVG rendering at a time."""
_STYLE = re.compile(r'\sstyle="([^"]*)"')
_ID = re.compile(r'\sid="([^"]*)"')


def _presentation(match: re.Match[str]) -> str:
    attributes = []
    for declaration in match.group(1).split(";"):
        name, _, value = declaration.partition(":")
        if name.strip() and value.strip():
            attributes.append(f' {name.strip()}="{value.strip().replace(chr(34), chr(39))}"')
    return "".join(attributes)


def inline_svg(document: str) -> str:
    """A matplotlib SVG document as an ``<svg>`` element fit for inlining (see
    :func:`panel_svg`)."""
    svg = document[document.index("<svg") :]
    svg = re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.S)
    svg = re.sub(r"<style[^>]*>.*?</style>", "", svg, flags=re.S)
    svg = _STYLE.sub(_presentation, svg)
    referred = set(re.findall(r"#([A-Za-z0-9_-]+)\)?\"", svg))
    svg = _ID.sub(lambda m: m.group(0) if m.group(1) in referred else "", svg)
    # the removed <style> said *{stroke-linejoin: round; stroke-linecap: butt}; the
    # root's attributes are inherited; the width follows the page's
    svg = re.sub(
        r'^<svg([^>]*?) width="[^"]*" height="[^"]*"',
        r'<svg\1 width="100%" stroke-linejoin="round" stroke-linecap="butt"',
        svg,
    )
    return svg.strip()


def write_chart(days: Sequence[DayReport], path: Path) -> None:
    """The chart of :func:`build_chart` as a PNG file."""
    fig = build_chart(days)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
