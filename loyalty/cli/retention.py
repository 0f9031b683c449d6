"""``loyalty retention run``: expire old ingress days and every row derived from them."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.table import Table

from loyalty.cli.common import (
    confirm_time_travel,
    echo_json,
    err,
    fail,
    load_settings,
    open_database,
    rfc3339_option,
    stdout_console,
    utc_text,
)

retention_app = typer.Typer(
    help="Expire old ingress events and every row derived from them.", no_args_is_help=True
)


@retention_app.command("run")
def retention_run(
    as_of: Annotated[
        str | None,
        typer.Option("--as-of", help="expire as of this RFC 3339 time (default: now)"),
    ] = None,
    strict: Annotated[
        bool,
        typer.Option(
            help="exit 1 when an expired day is kept (not processed yet, or not rolled up)"
        ),
    ] = False,
    drop_unrolled: Annotated[
        bool,
        typer.Option(
            help="also drop days processed before the daily rollups began (their activity "
            "is then missing from every report)"
        ),
    ] = False,
    json_output: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="only list the days that would be dropped")
    ] = False,
    yes: Annotated[
        bool, typer.Option("--yes", help="confirm a run with a future --as-of (drops for real)")
    ] = False,
) -> None:
    """Drop expired ingress days (PostgreSQL: whole partitions; SQLite: rows, then vacuum),
    expired cap counters and forget markers. Never an event the pipeline has not
    processed: such a day is kept and listed. A future --as-of needs --yes."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn

    from loyalty.bootstrap import build_retention

    moment = rfc3339_option(as_of, "--as-of") if as_of else datetime.now(UTC)
    confirm_time_travel(moment, yes=yes, dry_run=dry_run, what="drops ingress days")
    settings = load_settings()
    db = open_database(settings)
    if dry_run:
        try:
            cutoff, days = build_retention(db).due_days(moment)
        finally:
            db.dispose()
        plan = {"as_of": utc_text(moment), "cutoff": str(cutoff), "days": [str(d) for d in days]}
        if json_output:
            echo_json(plan)
        else:
            listed = ", ".join(plan["days"]) if days else "none"
            typer.echo(
                f"dry run: retention as of {utc_text(moment)} would expire the days before "
                f"{cutoff}: {len(days)} day(s) ({listed}); nothing was dropped"
            )
        return
    try:
        retention = build_retention(db)
        with Progress(
            SpinnerColumn(),
            *Progress.get_default_columns()[:1],
            BarColumn(),
            MofNCompleteColumn(),
            console=err,
            transient=True,
        ) as progress:
            task = progress.add_task("retention", total=None)

            def advanced(description: str, done: int, total: int) -> None:
                progress.update(task, description=description, completed=done, total=total)

            result = retention.run(
                moment, strict=strict, progress=advanced, drop_unrolled=drop_unrolled
            )
    finally:
        db.dispose()
    if result.skipped:
        raise fail("another process is running retention; try again later", 1)
    if json_output:
        echo_json(result.to_wire())
    else:
        out = stdout_console(120)
        out.print(
            f"retention as of {utc_text(result.as_of)}: keeping days from {result.cutoff} "
            f"({settings.retention_days} days), {settings.backend}",
            highlight=False,
        )
        if result.dropped:
            dropped = Table("dropped day", "rows", "bytes", title="expired and removed")
            for d in result.dropped:
                dropped.add_row(d.day.isoformat(), f"{d.rows:,}", f"{d.bytes:,}")
            out.print(dropped)
        else:
            out.print("nothing expired to drop")
        if result.kept:
            kept = Table("kept day", "events", "why", title="expired but KEPT")
            for k in result.kept:
                kept.add_row(
                    k.day.isoformat(),
                    f"{k.unprocessed_rows:,}",
                    "the pipeline has not processed these events yet"
                    if k.reason == "unprocessed"
                    else "processed before the daily rollups began (--drop-unrolled)",
                )
            out.print(kept)
        out.print(
            f"rows dropped: {result.rows_dropped:,}; bytes reclaimed: "
            f"{result.bytes_reclaimed:,}; cap rows deleted: {result.cap_rows_deleted:,}; "
            f"forget markers deleted: {result.markers_deleted:,}; {result.seconds:.2f}s",
            highlight=False,
        )
    if strict and result.kept:
        raise fail(
            f"{len(result.kept)} expired day(s) kept: events not processed yet or not rolled up",
            1,
        )
