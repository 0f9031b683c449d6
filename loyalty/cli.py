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
from loyalty.worker import build_worker, parse_shards

app = typer.Typer(
    help="loyalty: event-sourced loyalty service.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
keys_app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")

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
    if worker:
        pipeline_worker = build_worker(db, wanted)
        thread = threading.Thread(target=pipeline_worker.run, name="pipeline", daemon=True)
        thread.start()
    try:
        uvicorn.run(api, host=host, port=port, log_level="info", access_log=False)
    finally:
        if thread is not None:
            pipeline_worker.stop()
            thread.join(timeout=30)
        db.dispose()


@app.command("worker")
def worker_cmd(
    shards: Annotated[str, typer.Option(help="shards to work on: N, N-M, lists, or all")] = "all",
) -> None:
    """Run the pipeline worker alone (for scale-out: give each process its own shards)."""
    settings = load_settings()
    wanted = _shards(shards, settings)
    configure_logging(settings)
    db = open_database(settings)
    pipeline_worker = build_worker(db, wanted)

    def stop(_signum: int, _frame: object) -> None:
        pipeline_worker.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    logging.getLogger("loyalty").info("worker for shards %s", shards)
    pipeline_worker.run()
    db.dispose()


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
