"""What every command of the ``loyalty`` command line shares: settings, the database it
opens (and says which), errors with their exit codes, and the output helpers.

The command groups (one module each) import from here, never from ``loyalty.cli``
itself: the package only assembles them into the app."""

from __future__ import annotations

import logging
import sys
import time
from datetime import UTC, datetime
from typing import Annotated

import orjson
import typer
from pydantic import ValidationError
from rich.console import Console

from loyalty.adapters.db import Database
from loyalty.adapters.migrate import migrate
from loyalty.config import Settings
from loyalty.observability import configure_logging as setup_logging

err = Console(stderr=True)

STARTUP_WAIT_SECONDS = 300.0
"""How long ``serve`` and ``worker`` wait at start for a database out of reach."""


def fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def configure_logging(settings: Settings) -> None:
    """Every log line to stderr, as text or (``LOYALTY_LOG_FORMAT=json``) JSON."""
    setup_logging(settings.log_format)


def load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        name = "LOYALTY_" + str(first["loc"][0]).upper() if first["loc"] else "settings"
        raise fail(f"{name}: {first['msg']}", 2) from None


def echo_json(wire: object) -> None:
    """A command's JSON output on stdout, indented."""
    typer.echo(orjson.dumps(wire, option=orjson.OPT_INDENT_2).decode())


def stdout_console(width_when_piped: int) -> Console:
    """The console of a command's tables: the terminal's width, or when stdout is not a
    terminal (a pipe, a file) ``width_when_piped``, wide enough that no column is cut."""
    return Console(width=None if sys.stdout.isatty() else width_when_piped)


def utc_text(moment: datetime) -> str:
    """A moment as the API writes it: UTC, RFC 3339 with ``Z``, whole seconds when it has
    no fraction (``2026-12-04T09:20:03Z``)."""
    aware = moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)  # SQLite: naive UTC
    return aware.astimezone(UTC).isoformat().replace("+00:00", "Z")


def rfc3339_option(value: str, option: str) -> datetime:
    """An option's RFC 3339 time, or a clear error (exit 2)."""
    from loyalty.application.commands.fields import parse_rfc3339

    try:
        return parse_rfc3339(value.strip())
    except ValueError as exc:
        raise fail(f"{option} {value!r}: {exc}", 2) from None


def confirm_time_travel(moment: datetime, *, yes: bool, dry_run: bool, what: str) -> None:
    """Refuse a destructive run as of a future time unless ``--yes`` (``--dry-run``
    shows what it would do): such a run does now, for real, what is due only then."""
    if dry_run or yes or moment <= datetime.now(UTC):
        return
    raise fail(
        f"--as-of {utc_text(moment)} is in the future: this {what} for real, now, "
        "everything due by then. See it first with --dry-run; pass --yes to do it.",
        2,
    )


def database_label(settings: Settings) -> str:
    """Which database ``settings`` name, as a command prints it: a SQLite file's absolute
    path (a relative URL is relative to the working directory), a PostgreSQL URL without
    its password."""
    if settings.backend == "sqlite":
        return f"sqlite {settings.sqlite_path.resolve()}"
    from sqlalchemy.engine import make_url

    return make_url(settings.sqlalchemy_url).set(drivername="postgresql").render_as_string()


_create = {"allowed": False}
"""Set by ``loyalty --create``: a one-shot command may create a new SQLite file."""


def options(
    create: Annotated[
        bool,
        typer.Option(
            "--create",
            help="let a one-shot command create a new SQLite database (by default only "
            "`migrate`, `serve`, `worker` and `relay` do: run elsewhere, a relative "
            "LOYALTY_DATABASE_URL would name another file)",
        ),
    ] = False,
) -> None:
    """loyalty: event-sourced loyalty service. Every command that opens the database
    prints which one on stderr."""
    _create["allowed"] = create


def open_database(
    settings: Settings, wait_seconds: float = 0.0, *, create: bool = False
) -> Database:
    """The database, with its schema brought up to date (safe when run concurrently),
    after printing which one it is on stderr (stdout stays the command's output).

    ``create``: whether a missing SQLite file may be created (the long-running commands
    and ``migrate``; any command under ``loyalty --create``). A one-shot command run from
    another directory than the server's would otherwise make and use a new, empty
    database (the default URL is relative): it refuses, naming the file it looked for.

    ``wait_seconds``: how long a long-running process (serve, worker) waits for a
    database that is out of reach or busy before giving up, instead of dying at once (a
    worker started while the database restarts would otherwise exit and be restarted
    from scratch by its supervisor, seconds later)."""
    import eventsourcing.persistence as es
    import psycopg
    import sqlalchemy as sa

    from loyalty.adapters.db import DatabaseUnavailable, database_busy

    said = f"database: {database_label(settings)}"
    if settings.log_format == "json":  # stderr is one JSON object per line
        from loyalty.observability import JsonFormatter

        said = JsonFormatter().format(
            logging.makeLogRecord(
                {"name": "loyalty.cli", "levelname": "INFO", "levelno": logging.INFO, "msg": said}
            )
        )
    typer.echo(said, err=True)
    if (
        settings.backend == "sqlite"
        and not (create or _create["allowed"])
        and not settings.sqlite_path.exists()
    ):
        raise fail(
            f"no database at {settings.sqlite_path.resolve()} (LOYALTY_DATABASE_URL="
            f"{settings.database_url}, relative to the working directory): run the command "
            "where the server runs, set LOYALTY_DATABASE_URL to an absolute path, or create "
            "it with `loyalty migrate` (or `loyalty --create ...`)",
            2,
        )
    db = Database(settings)
    deadline = time.monotonic() + wait_seconds
    pause = 0.2
    while True:
        try:
            migrate(db)
            return db
        except (
            sa.exc.SQLAlchemyError,
            psycopg.Error,
            es.PersistenceError,
            DatabaseUnavailable,
        ) as exc:
            if not database_busy(exc) or time.monotonic() + pause > deadline:
                raise
            logging.getLogger("loyalty.cli").warning(
                "database unavailable (%s); retrying in %.1f s", type(exc).__name__, pause
            )
        db.engine.dispose()
        time.sleep(pause)
        pause = min(pause * 2, 2.0)
