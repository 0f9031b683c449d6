"""The ``loyalty`` command line: a composition root (settings -> adapters -> use cases)."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from loyalty.adapters.db import Database
from loyalty.adapters.keys import KeyStore, Role
from loyalty.adapters.migrate import migrate
from loyalty.config import Settings
from loyalty.worker import (
    build_projection,
    build_projection_worker,
    build_worker,
    parse_shards,
    projection_lease,
)

app = typer.Typer(
    help="loyalty: event-sourced loyalty service.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
keys_app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
projections_app = typer.Typer(help="Maintain the read models.", no_args_is_help=True)
app.add_typer(projections_app, name="projections")

err = Console(stderr=True)


def fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(code)


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )


def load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        name = "LOYALTY_" + str(first["loc"][0]).upper() if first["loc"] else "settings"
        raise fail(f"{name}: {first['msg']}", 2) from None


def open_database(settings: Settings) -> Database:
    """The database, with its schema brought up to date (safe when run concurrently)."""
    db = Database(settings)
    migrate(db)
    return db


@app.command("migrate")
def migrate_cmd() -> None:
    """Bring the database schema up to date."""
    settings = load_settings()
    db = Database(settings)
    revision = migrate(db)
    db.dispose()
    typer.echo(f"schema at revision {revision}")


def _shards(spec: str, settings: Settings) -> list[int]:
    try:
        return parse_shards(spec, settings.shard_count)
    except ValueError as exc:
        raise fail(str(exc), 2) from None


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    worker: Annotated[
        bool, typer.Option("--worker/--no-worker", help="run the pipeline in this process")
    ] = True,
    shards: Annotated[str, typer.Option(help="shards for the embedded worker")] = "all",
) -> None:
    """Migrate, then run the HTTP API (and, by default, the pipeline worker)."""
    import uvicorn

    from loyalty.api.app import create_app

    settings = load_settings()
    wanted = _shards(shards, settings)
    configure_logging(settings)
    db = open_database(settings)
    api = create_app(settings, db=db)
    thread = None
    projection_thread = None
    if worker:
        pipeline_worker = build_worker(db, wanted)
        thread = threading.Thread(target=pipeline_worker.run, name="pipeline", daemon=True)
        thread.start()
        # The read models in their own thread: a long pipeline window never delays them.
        projection_worker = build_projection_worker(db)
        projection_thread = threading.Thread(
            target=projection_worker.run, name="projection", daemon=True
        )
        projection_thread.start()
    try:
        uvicorn.run(api, host=host, port=port, log_level="info", access_log=False)
    finally:
        if thread is not None:
            pipeline_worker.stop()
            thread.join(timeout=30)
        if projection_thread is not None:
            projection_worker.stop()
            projection_thread.join(timeout=30)
        db.dispose()


@app.command("worker")
def worker_cmd(
    shards: Annotated[str, typer.Option(help="shards to work on: N, N-M, lists, or all")] = "all",
    projections: Annotated[
        bool,
        typer.Option(
            "--projections/--no-projections",
            help="also keep the read models up to date (one process at a time holds them)",
        ),
    ] = True,
    projection_batch: Annotated[
        int, typer.Option(min=1, max=100_000, help="events per read-model transaction")
    ] = 500,
) -> None:
    """Run the pipeline worker alone (for scale-out: give each process its own shards)."""
    settings = load_settings()
    wanted = _shards(shards, settings)
    configure_logging(settings)
    db = open_database(settings)
    pipeline_worker = build_worker(db, wanted)
    projection_worker = build_projection_worker(db, batch_size=projection_batch)
    projection_thread = threading.Thread(
        target=projection_worker.run, name="projection", daemon=True
    )

    def stop(_signum: int, _frame: object) -> None:
        pipeline_worker.stop()
        projection_worker.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    logging.getLogger("loyalty").info("worker for shards %s", shards)
    if projections:
        projection_thread.start()
    pipeline_worker.run()
    if projections:
        projection_thread.join(timeout=30)
    db.dispose()


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
    from loyalty.application.accounts import Members

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
    finally:
        members.close()
        lease.release()
        db.dispose()
    typer.echo(f"rebuilt read models from {applied} events (position {projection.position()})")


@keys_app.command("create")
def keys_create(
    role: Annotated[Role, typer.Option(help="what the key may do")],
    name: Annotated[str, typer.Option(help="who holds it; for ingest keys, the event source")],
) -> None:
    """Create a key; it is printed once, as the last line, and stored only as a hash."""
    db = open_database(load_settings())
    try:
        key = KeyStore(db).create(role, name)
    except ValueError as exc:
        raise fail(str(exc), 2) from None
    finally:
        db.dispose()
    typer.echo(f"created {role.value} key for {name}; keep it secret, it is not shown again:")
    typer.echo(key)


@keys_app.command("list")
def keys_list() -> None:
    """List keys (ids, names, roles; never the secrets)."""
    db = open_database(load_settings())
    rows = KeyStore(db).list()
    db.dispose()
    table = Table("key_id", "name", "role", "created_at", "revoked_at")
    for k in rows:
        table.add_row(
            k.key_id,
            k.name,
            k.role.value,
            k.created_at.isoformat(),
            k.revoked_at.isoformat() if k.revoked_at else "",
        )
    Console().print(table)


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="the key id (or the full key)")],
) -> None:
    """Revoke a key; other processes stop accepting it within the auth cache time."""
    db = open_database(load_settings())
    revoked = KeyStore(db).revoke(key_id)
    db.dispose()
    if not revoked:
        raise fail("no active key with that id", 1)
    typer.echo(f"revoked {key_id}")


def main() -> None:
    app(prog_name="loyalty")


if __name__ == "__main__":
    main()
