"""``loyalty expiry run``: expire due currency lots now, or as of a given time."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import typer

from loyalty.cli.common import (
    confirm_time_travel,
    echo_json,
    err,
    fail,
    load_settings,
    open_database,
    rfc3339_option,
    utc_text,
)

expiry_app = typer.Typer(
    help="Currency expiry (the rules' currency_expiry): run the job.", no_args_is_help=True
)


@expiry_app.command("run")
def expiry_run(
    as_of: Annotated[
        str | None,
        typer.Option(
            "--as-of",
            help="evaluate as if at this RFC 3339 time (back-fill, time travel; default: now)",
        ),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="only count what would expire (members, total); no change"),
    ] = False,
    yes: Annotated[
        bool,
        typer.Option("--yes", help="confirm a run with a future --as-of (expires for real)"),
    ] = False,
) -> None:
    """Expire every currency lot due at the time (one CurrencyExpired per lot, each lot
    once); reads only members with lots due. Safe to repeat and to run beside workers.
    A future --as-of expires, for real and at once, what is due by then: it needs --yes
    (see it first with --dry-run)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from loyalty.bootstrap import build_expiry

    moment = rfc3339_option(as_of, "--as-of") if as_of else datetime.now(UTC)
    confirm_time_travel(moment, yes=yes, dry_run=dry_run, what="expires currency")
    settings = load_settings()
    db = open_database(settings)
    if dry_run:
        try:
            preview = build_expiry(db).preview(moment)
        finally:
            db.dispose()
        wire = {**preview.to_wire(), "dry_run": True}
        if json_output:
            echo_json(wire)
        elif preview.rule is None:
            typer.echo("dry run: currency expiry is off; nothing would expire")
        else:
            typer.echo(
                f"dry run: as of {utc_text(moment)}, {preview.amount:,} currency of "
                f"{preview.members:,} members would expire ({preview.lots:,} lots); "
                "nothing was changed"
            )
        return
    try:
        expiry = build_expiry(db)
        with Progress(
            *Progress.get_default_columns()[:1],
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=err,
            transient=True,
        ) as progress:
            task = progress.add_task("expiring lots", total=None)

            def advanced(done: int, total: int) -> None:
                progress.update(task, completed=done, total=total)

            report = expiry.run(moment, progress=advanced)
    finally:
        db.dispose()
    if report.skipped:
        raise fail("another process is running expiry; try again later", 1)
    if json_output:
        echo_json(report.to_wire())
    else:
        typer.echo(report.summary())
    if report.interrupted:
        raise fail("the expiry lease was lost; run again to finish", 1)
