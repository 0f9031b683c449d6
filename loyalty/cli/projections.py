"""``loyalty projections``: rebuild the read models, and their position, lag and
quarantined events."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from loyalty.bootstrap import build_projection
from loyalty.cli.common import (
    echo_json,
    err,
    fail,
    load_settings,
    open_database,
    stdout_console,
    utc_text,
)
from loyalty.worker import projection_lease

projections_app = typer.Typer(help="Maintain the read models.", no_args_is_help=True)


@projections_app.command("rebuild")
def projections_rebuild(
    batch: Annotated[
        int, typer.Option(min=1, max=100_000, help="events per read-model transaction")
    ] = 1000,
) -> None:
    """Empty the read models and replay every account event into them.

    Stop the processes running the projection first (``serve`` with its worker, or
    ``loyalty worker``): the rebuild takes the projection's lease and refuses to start
    while another process holds it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from loyalty.adapters.event_store import event_store_env
    from loyalty.adapters.read_models import ReadModels
    from loyalty.application.accounts import Members
    from loyalty.application.projections import PROJECTION_NAME

    settings = load_settings()
    db = open_database(settings)
    lease = projection_lease(db)
    if not lease.try_acquire():
        db.dispose()
        raise fail("another process runs the projection (serve or worker); stop it first", 1)
    members = Members(env=event_store_env(settings))
    try:
        projection = build_projection(db, members)
        projection.batch_size = batch
        head = projection.head()
        projection.reset()
        columns = (
            *Progress.get_default_columns()[:1],
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=err) as progress:
            task = progress.add_task("rebuilding read models", total=max(head, 1))

            def advanced(position: int) -> None:
                progress.update(task, completed=position, total=max(head, position, 1))

            applied = projection.catch_up(on_batch=advanced)
            progress.update(task, completed=max(projection.position(), head, 1))
        quarantined = ReadModels(db).quarantined_count(PROJECTION_NAME)
    finally:
        members.close()
        lease.release()
        db.dispose()
    typer.echo(f"rebuilt read models from {applied} events (position {projection.position()})")
    if quarantined:
        typer.echo(
            f"{quarantined} events could not be applied and are quarantined: "
            "see `loyalty projections status`, repair with `loyalty doctor --repair`"
        )


@projections_app.command("status")
def projections_status(
    json_output: Annotated[bool, typer.Option("--json", help="print the status as JSON")] = False,
) -> None:
    """Position and lag of the read models, and the events they quarantined (passed over
    because they could not apply them; see ``loyalty doctor``)."""
    from loyalty.adapters.event_store import event_store_env
    from loyalty.adapters.read_models import ReadModels
    from loyalty.application.accounts import Members
    from loyalty.application.projections import PROJECTION_NAME

    settings = load_settings()
    db = open_database(settings)
    members = Members(env=event_store_env(settings))
    try:
        read_models = ReadModels(db)
        position = read_models.position(PROJECTION_NAME)
        head = int(members.recorder.max_notification_id() or 0)
        held = read_models.quarantined(limit=100)
        total = read_models.quarantined_count()
    finally:
        members.close()
        db.dispose()
    if json_output:
        wire = {
            "projection": PROJECTION_NAME,
            "position": position,
            "head": head,
            "lag_events": max(0, head - position),
            "quarantined_events": total,
            "quarantined": [
                {
                    "position": q.event.position,
                    "stream": q.event.member_id,
                    "version": q.event.originator_version,
                    "topic": q.event.topic,
                    "error": q.event.error,
                    "quarantined_at": utc_text(q.quarantined_at),
                }
                for q in held
            ],
        }
        echo_json(wire)
        return
    out = stdout_console(160)
    out.print(
        f"projection {PROJECTION_NAME}: position {position:,} of {head:,} "
        f"(lag {max(0, head - position):,} events); quarantined events: {total:,}",
        highlight=False,
    )
    if held:
        table = Table("position", "stream", "version", "event", "error", title="quarantined")
        for q in held:
            table.add_row(
                str(q.event.position),
                q.event.member_id,
                str(q.event.originator_version),
                q.event.topic,
                q.event.error,
            )
        out.print(table)
        out.print("repair with `loyalty doctor --repair`", highlight=False)
