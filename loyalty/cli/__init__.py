"""The ``loyalty`` command line: a composition root (settings -> adapters -> use cases)."""

from __future__ import annotations

import inspect
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from loyalty.adapters.db import Database
from loyalty.adapters.keys import KeyStore
from loyalty.adapters.migrate import migrate
from loyalty.application.access import Role
from loyalty.application.delivery import WebhookAdmin
from loyalty.bootstrap import build_forget_service, build_projection, build_worker, parse_shards
from loyalty.config import Settings
from loyalty.observability import Metrics
from loyalty.observability import configure_logging as setup_logging
from loyalty.worker import (
    build_projection_worker,
    projection_lease,
    start_forget_runner,
    start_webhook_runner,
)

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
keys_app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
projections_app = typer.Typer(help="Maintain the read models.", no_args_is_help=True)
app.add_typer(projections_app, name="projections")
rules_app = typer.Typer(
    help="The weighting rules: show, load, try a change on past events (dry-run), apply a "
    "change to past awards, and its compensation runs.",
    no_args_is_help=True,
)
app.add_typer(rules_app, name="rules")

err = Console(stderr=True)


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


def read_rules_file(file: str) -> dict[str, Any]:
    """A rules file (``-``: stdin) as a JSON object, read as ``PUT /v1/rules`` reads its
    body (:func:`loyalty.api.schemas.rules_document`: an object repeating a key is
    refused), or a clear error (exit 2)."""
    from loyalty.api.guards import BodyProblem
    from loyalty.api.schemas import rules_document

    try:
        raw = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
    except OSError as exc:
        raise fail(f"{file}: {exc.strerror or exc}", 2) from None
    try:
        return rules_document(raw)
    except BodyProblem as exc:
        cause = exc.__cause__
        if exc.code == "invalid_rules":
            raise fail(f"{file}: must be a JSON object with 'rules' and 'ranks'", 2) from None
        detail = f"{exc.detail}: {cause}" if cause is not None else exc.detail
        raise fail(f"{file}: {detail}", 2) from None


STARTUP_WAIT_SECONDS = 300.0
"""How long ``serve`` and ``worker`` wait at start for a database out of reach."""


def utc_text(moment: datetime) -> str:
    """A moment as the API writes it: UTC, RFC 3339 with ``Z``, whole seconds when it has
    no fraction (``2026-12-04T09:20:03Z``)."""
    aware = moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)  # SQLite: naive UTC
    return aware.astimezone(UTC).isoformat().replace("+00:00", "Z")


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


@app.callback()
def _options(
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

    from loyalty.adapters.db import DatabaseUnavailable
    from loyalty.api.problems import database_busy

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
            logging.getLogger(__name__).warning(
                "database unavailable (%s); retrying in %.1f s", type(exc).__name__, pause
            )
        db.engine.dispose()
        time.sleep(pause)
        pause = min(pause * 2, 2.0)


@app.command("migrate")
def migrate_cmd() -> None:
    """Bring the database schema up to date."""
    db = open_database(load_settings(), create=True)
    revision = migrate(db)
    db.dispose()
    typer.echo(f"schema at revision {revision}")


def _shards(spec: str, settings: Settings) -> list[int]:
    try:
        return parse_shards(spec, settings.shard_count)
    except ValueError as exc:
        raise fail(str(exc), 2) from None


def _exit_cleanly(signum: int, _frame: object) -> None:
    raise SystemExit(0)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    worker: Annotated[
        bool,
        typer.Option(
            "--worker/--no-worker",
            help="also run the pipeline and the read models (supervised child processes)",
        ),
    ] = True,
    shards: Annotated[str, typer.Option(help="shards for the embedded worker")] = "all",
) -> None:
    """Migrate, then run the HTTP API (and, by default, the pipeline worker beside it).

    The worker is two supervised child processes (``loyalty worker --no-projections``
    and ``loyalty worker --no-pipeline``): one interpreter cannot ingest at full rate,
    weigh what it ingested and project the accounts at once. They are restarted if they
    die, stopped with serve, and their metrics merged into serve's (exposed on
    ``LOYALTY_METRICS_PORT``, or as ``GET /metrics`` with ``LOYALTY_METRICS_TOKEN``).

    The HTTP server enforces the edge limits itself: header size and count, header- and
    body-read timeouts, a connection cap (the LOYALTY_HTTP_* settings)."""
    import uvicorn

    from loyalty.api.app import create_app
    from loyalty.api.http_server import ensure_descriptors, http_limits, limited_protocol
    from loyalty.worker_process import merged_registry, worker_children

    settings = load_settings()
    _shards(shards, settings)  # refuse a bad spec before anything starts
    configure_logging(settings)
    ensure_descriptors(settings.http_max_connections)
    db = open_database(settings, wait_seconds=STARTUP_WAIT_SECONDS, create=True)
    metrics = Metrics()
    children = []
    if worker:
        children = worker_children(shards)
        metrics.exposition = merged_registry(metrics.registry, children)
    api = create_app(settings, db=db, metrics=metrics)
    if settings.metrics_port is not None:
        from prometheus_client import start_http_server

        try:
            start_http_server(
                settings.metrics_port, addr=settings.metrics_host, registry=metrics.exposition
            )
        except OSError as exc:
            db.dispose()
            where = f"{settings.metrics_host}:{settings.metrics_port}"
            raise fail(f"cannot serve metrics on {where}: {exc}", 1) from None
    for child in children:
        child.start()
    logging.getLogger("loyalty").info(
        "%s", "\n  ".join(startup_summary(settings, host, port, worker, shards))
    )
    # uvicorn shuts down on SIGTERM/SIGINT, then raises the signal again with the
    # handlers it found: make those end this process through the finally block below
    # (the worker stopped after its window), not by the default action.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _exit_cleanly)
    try:
        uvicorn.run(
            api,
            host=host,
            port=port,
            log_level="info",
            access_log=settings.access_log,
            log_config=None,
            http=limited_protocol(http_limits(settings)),
            timeout_keep_alive=max(1, round(settings.http_keep_alive_seconds)),
        )
    finally:
        for child in children:
            child.stop()
        db.dispose()


def startup_summary(
    settings: Settings, host: str, port: int, worker: bool, shards: str
) -> list[str]:
    """What ``serve`` tells an operator at start: where things are and how to sign in."""
    shown = "[::1]" if host == "::1" else ("127.0.0.1" if host in ("0.0.0.0", "::") else host)
    base = f"http://{shown}:{port}"
    return [
        f"loyalty is starting on {base} (bound to {host}:{port})",
        f"API and its docs: {base}/docs",
        f"console:          {base}/console/ (sign in with an operator key)",
        "an operator key:  loyalty keys create --role operator --name <who>",
        f"database:         {database_label(settings)}",
        "worker:           "
        + (f"pipeline and read models, shards {shards}" if worker else "off (--no-worker)"),
        "access log:       "
        + ("on" if settings.access_log else "off (LOYALTY_ACCESS_LOG=true turns it on)"),
    ]


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
    pipeline: Annotated[
        bool,
        typer.Option(
            "--pipeline/--no-pipeline",
            help="run the pipeline, retention and forget-me (--no-pipeline: read models only)",
        ),
    ] = True,
    projection_batch: Annotated[
        int, typer.Option(min=1, max=100_000, help="events per read-model transaction")
    ] = 500,
    metrics_port: Annotated[
        int | None,
        typer.Option(min=1, max=65535, help="serve prometheus metrics on this port"),
    ] = None,
    metrics_host: Annotated[
        str, typer.Option(help="interface for --metrics-port (0.0.0.0 in a container)")
    ] = "127.0.0.1",
    parent_pid: Annotated[
        int | None,
        typer.Option(help="stop when this process (serve, which started it) is gone"),
    ] = None,
    webhooks: Annotated[
        bool,
        typer.Option(
            "--webhooks/--no-webhooks",
            help="also deliver webhooks (one process at a time holds them)",
        ),
    ] = True,
) -> None:
    """Run the pipeline worker alone (for scale-out: give each process its own shards)."""
    if not pipeline and not projections:
        raise fail("--no-pipeline and --no-projections leave nothing to run", 2)
    settings = load_settings()
    wanted = _shards(shards, settings)
    configure_logging(settings)
    db = open_database(settings, wait_seconds=STARTUP_WAIT_SECONDS, create=True)
    metrics = Metrics()
    if metrics_port is not None:
        from prometheus_client import start_http_server

        try:
            start_http_server(metrics_port, addr=metrics_host, registry=metrics.registry)
        except OSError as exc:
            db.dispose()
            raise fail(f"cannot serve metrics on {metrics_host}:{metrics_port}: {exc}", 1) from None
    projection_worker = build_projection_worker(db, batch_size=projection_batch, metrics=metrics)
    # the read models alone (serve's second child) need no pipeline to be built
    pipeline_worker = build_worker(db, wanted, metrics=metrics) if pipeline else None

    def stop(_signum: int, _frame: object) -> None:
        if pipeline_worker is not None:
            pipeline_worker.stop()
        projection_worker.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if parent_pid is not None:
        _stop_when_orphaned(parent_pid, lambda: stop(signal.SIGTERM, None))
    webhook_runner = start_webhook_runner(db, metrics=metrics) if webhooks else None
    if pipeline_worker is None:
        logging.getLogger("loyalty").info("worker for the read models")
        projection_worker.run()
        if webhook_runner is not None:
            webhook_runner.stop()
        db.dispose()
        return
    projection_thread = threading.Thread(
        target=projection_worker.run, name="projection", daemon=True
    )
    logging.getLogger("loyalty").info("worker for shards %s", shards)
    if projections:
        projection_thread.start()
    forget_runner = start_forget_runner(db)
    from loyalty.worker import start_retention_thread

    retention_job = start_retention_thread(db, metrics=metrics)
    from loyalty.worker import start_expiry_thread

    expiry_job = start_expiry_thread(db, metrics=metrics)
    pipeline_worker.run()
    if expiry_job is not None:
        expiry_job[0].stop()
    if webhook_runner is not None:
        webhook_runner.stop()
    forget_runner.stop()
    if retention_job is not None:
        retention_job[0].stop()
    if projections:
        projection_thread.join(timeout=30)
    db.dispose()


def _stop_when_orphaned(parent_pid: int, stop: Callable[[], None]) -> None:
    """Call ``stop`` once ``parent_pid`` is no longer this process's parent (it died,
    even by kill -9, and the child was re-parented)."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        logging.getLogger("loyalty").warning("serve (pid %d) is gone; stopping", parent_pid)
        stop()

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


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
    import orjson

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
        typer.echo(orjson.dumps(wire, option=orjson.OPT_INDENT_2).decode())
        return
    out = Console(width=None if sys.stdout.isatty() else 160)
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


@app.command("doctor")
def doctor_cmd(
    repair: Annotated[
        bool,
        typer.Option(
            "--repair",
            help="finish erasing orphan streams, release stale quarantine entries, "
            "erase read models of accounts without a stream",
        ),
    ] = False,
    json_output: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """Find impossible states: member streams without their first event or with a gap,
    quarantined events, balance rows without a stream. Exits 1 when any is found
    (after --repair: when any is left)."""
    import orjson

    from loyalty.adapters.doctor import Doctor

    db = open_database(load_settings())
    try:
        doctor = Doctor(db)
        found = doctor.examine()
        repaired = doctor.repair(found) if repair else None
        after = doctor.examine() if repair else found
    finally:
        db.dispose()
    if json_output:
        wire: dict[str, object] = {"found": found.to_wire()}
        if repaired is not None:
            wire["repaired"] = repaired.to_wire()
            wire["after"] = after.to_wire()
        typer.echo(orjson.dumps(wire, option=orjson.OPT_INDENT_2).decode())
    else:
        out = Console(width=None if sys.stdout.isatty() else 160)
        table = Table("check", "found", title=f"loyalty doctor, {found.backend}")
        table.add_row("streams without their first event", str(len(found.orphan_streams)))
        table.add_row("streams with a gap", str(len(found.gapped_streams)))
        table.add_row("quarantined events", str(found.quarantined))
        table.add_row("balance rows without a stream", str(len(found.balances_without_stream)))
        table.add_row("forget-me requests not completed", str(found.unfinished_forget_requests))
        table.add_row(
            "unfinished compensation runs (rules versions)",
            ", ".join(str(r["new_version"]) for r in found.unfinished_compensations) or "0",
        )
        out.print(table)
        for orphan in found.orphan_streams:
            out.print(
                f"orphan stream {orphan.member_id}: versions {orphan.first_version}-"
                f"{orphan.last_version} ({orphan.events} events)",
                highlight=False,
            )
        for gapped in found.gapped_streams:
            out.print(
                f"gap in stream {gapped.member_id}: {gapped.events} events in versions "
                f"{gapped.first_version}-{gapped.last_version}",
                highlight=False,
            )
        if repaired is not None:
            out.print(
                f"repaired: {repaired.orphan_streams_erased} orphan streams erased "
                f"({repaired.events_erased} events), {repaired.quarantine_released} "
                f"quarantine entries released, {repaired.read_models_erased} read-model rows "
                "erased",
                highlight=False,
            )
            for note in repaired.skipped:
                out.print(f"not repaired: {note}", highlight=False)
        out.print("healthy" if after.healthy else "problems remain", highlight=False)
    if not after.healthy:
        raise typer.Exit(1)


@keys_app.command("create")
def keys_create(
    role: Annotated[Role, typer.Option(help="what the key may do")],
    name: Annotated[str, typer.Option(help="who holds it; for ingest keys, the event source")],
) -> None:
    """Create a key; it is printed once, as the last line, and stored only as a hash."""
    db = open_database(load_settings())
    try:
        store = KeyStore(db)
        namesakes = store.namesakes(name)
        key = store.create(role, name)
    except ValueError as exc:
        raise fail(str(exc), 2) from None
    finally:
        db.dispose()
    if namesakes:
        ids = ", ".join(f"{k.key_id} ({k.role.value})" for k in namesakes)
        err.print(
            f"warning: another active key is named {name}: {ids}; if this one replaces it, "
            "revoke the old one (loyalty keys revoke KEY_ID) once the new one is in use",
            soft_wrap=True,
            highlight=False,
        )
    typer.echo(f"created {role.value} key for {name}; keep it secret, it is not shown again:")
    typer.echo(key)


@keys_app.command("list")
def keys_list() -> None:
    """List keys (ids, names, roles; never the secrets)."""
    db = open_database(load_settings())
    rows = KeyStore(db).list()
    db.dispose()
    table = Table(box=None, pad_edge=False)
    table.add_column("key_id", no_wrap=True)
    table.add_column("name", overflow="fold")
    table.add_column("role", no_wrap=True)
    table.add_column("created_at", no_wrap=True)  # whole, whatever the width
    table.add_column("revoked_at", no_wrap=True)
    for k in rows:
        table.add_row(
            k.key_id,
            k.name,
            k.role.value,
            utc_text(k.created_at.replace(microsecond=0)),
            utc_text(k.revoked_at.replace(microsecond=0)) if k.revoked_at else "",
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


@app.command("forget")
def forget_cmd(
    user_id: Annotated[str, typer.Argument(help="the member to erase everywhere")],
    wait: Annotated[float, typer.Option(help="seconds to wait for completion")] = 120.0,
) -> None:
    """Forget a member: erase every copy of their data, then print the receipt."""
    import time

    import orjson

    from loyalty.adapters.lease_keys import FORGET_LEASE
    from loyalty.adapters.pipeline_store import ShardLeases
    from loyalty.api.schemas import ForgetRequestBody

    try:  # the API's command (POST /v1/forget-requests): the same user-id rule
        user_id = ForgetRequestBody.model_validate({"user_id": user_id}).user_id
    except ValidationError as exc:
        reason = exc.errors(include_url=False, include_input=False)[0]["msg"]
        raise fail(f"user id: {reason}", 2) from None
    settings = load_settings()
    db = open_database(settings)
    service = build_forget_service(db)
    request = service.request(user_id)
    leases = ShardLeases(db)
    deadline = time.monotonic() + wait
    while True:
        if leases.try_acquire(FORGET_LEASE):  # no worker is doing it: do it here
            service.run_pending()
            leases.release_all()
        found = service.status(request.request_id)
        if found is not None and found.status == "completed":
            break
        if time.monotonic() > deadline:
            db.dispose()
            raise fail(f"request {request.request_id} not completed yet; check it later", 1)
        time.sleep(0.5)
    db.dispose()
    receipt = {
        "request_id": found.request_id,
        "status": found.status,
        "requested_at": utc_text(found.requested_at),
        "completed_at": utc_text(found.completed_at) if found.completed_at else None,
        "erased": found.erased,
    }
    typer.echo(orjson.dumps(receipt, option=orjson.OPT_INDENT_2).decode())


@rules_app.command("show")
def rules_show() -> None:
    """Print the current rules (JSON, with their version)."""
    import orjson

    from loyalty.adapters.rules_store import RulesStore
    from loyalty.application.commands.rules import rule_set_to_wire

    db = open_database(load_settings())
    try:
        rule_set = RulesStore(db).current()
    finally:
        db.dispose()
    typer.echo(orjson.dumps(rule_set_to_wire(rule_set), option=orjson.OPT_INDENT_2).decode())


@rules_app.command("load")
def rules_load(
    file: Annotated[
        str, typer.Argument(help="a JSON file {rules:[...], ranks:[...]}; - reads stdin")
    ],
) -> None:
    """Validate a rules file like PUT /v1/rules and store it as the next version."""
    from loyalty.adapters.rules_store import RulesStore
    from loyalty.domain.errors import InvalidRules

    wire = read_rules_file(file)
    db = open_database(load_settings())
    try:
        rule_set = RulesStore(db).put(wire)
    except InvalidRules as exc:
        raise fail(f"{file}: {exc.message}", 2) from None
    finally:
        db.dispose()
    typer.echo(f"loaded rules version {rule_set.version}")


@app.command()
def simulate(
    key: Annotated[str, typer.Option(help="an ingest key")],
    url: Annotated[str, typer.Option(help="base URL of the running service")] = (
        "http://127.0.0.1:8000"
    ),
    users: Annotated[int, typer.Option(min=1, help="distinct members (Zipf-skewed)")] = 1000,
    events: Annotated[int, typer.Option(min=1, help="events to send in all")] = 10_000,
    batch_size: Annotated[int, typer.Option(min=1, max=10_000, help="events per batch")] = 500,
    rate: Annotated[float, typer.Option(min=0, help="events per second; 0 = unthrottled")] = 0,
    seed: Annotated[
        int | None, typer.Option(help="repeatable run: same users, types and event ids")
    ] = None,
    duration: Annotated[
        float | None, typer.Option(min=0.001, help="stop after this many seconds")
    ] = None,
    concurrency: Annotated[int, typer.Option(min=1, max=64, help="connections")] = 2,
) -> None:
    """Post realistic activity to a running service, with a live progress bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from loyalty.simulate import Simulation, SimulationConfig, SimulationError

    config = SimulationConfig(
        url=url,
        key=key,
        users=users,
        events=events,
        batch_size=batch_size,
        rate=rate,
        seed=seed,
        duration=duration,
        concurrency=concurrency,
    )
    columns = (
        *Progress.get_default_columns()[:1],
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    try:
        sim = Simulation(config)
    except SimulationError as exc:
        raise fail(str(exc), exc.exit_code) from None
    # Transient: the bar goes away at the end; the summary line below stays.
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task("posting events", total=events)
        sim.on_progress = lambda n: progress.advance(task, n)
        try:
            result = sim.run()
        except SimulationError as exc:
            progress.stop()
            raise fail(str(exc), exc.exit_code) from None
    typer.echo(
        f"sent {result.sent} events in {result.batches} batches in {result.seconds:.1f}s: "
        f"accepted {result.accepted}, duplicates {result.duplicates}, "
        f"rejected {result.rejected}; {result.events_per_second:,.0f} events/s"
    )


retention_app = typer.Typer(
    help="Expire old ingress events and every row derived from them.", no_args_is_help=True
)
app.add_typer(retention_app, name="retention")


def _rfc3339(value: str, option: str) -> datetime:
    from loyalty.api.schemas import parse_rfc3339

    try:
        return parse_rfc3339(value.strip())
    except ValueError as exc:
        raise fail(f"{option} {value!r}: {exc}", 2) from None


def confirm_time_travel(moment: datetime, *, yes: bool, dry_run: bool, what: str) -> None:
    """Refuse a destructive run as of a future time unless ``--yes`` (``--dry-run``
    shows what it would do): such a run does now, for real, what is due only then."""
    from datetime import UTC

    if dry_run or yes or moment <= datetime.now(UTC):
        return
    raise fail(
        f"--as-of {utc_text(moment)} is in the future: this {what} for real, now, "
        "everything due by then. See it first with --dry-run; pass --yes to do it.",
        2,
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
    from datetime import UTC

    import orjson
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn

    from loyalty.bootstrap import build_retention

    moment = _rfc3339(as_of, "--as-of") if as_of else datetime.now(UTC)
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
            typer.echo(orjson.dumps(plan, option=orjson.OPT_INDENT_2).decode())
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
        typer.echo(orjson.dumps(result.to_wire(), option=orjson.OPT_INDENT_2).decode())
    else:
        out = Console(width=None if sys.stdout.isatty() else 120)
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


@app.command("storage")
def storage_cmd(
    json_output: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """Rows and bytes per location: ingress partitions, event store, read models, the
    pipeline's and forget-me's tables, and the rest."""
    import orjson

    from loyalty.adapters.storage import storage_report

    db = open_database(load_settings())
    try:
        result = storage_report(db)
    finally:
        db.dispose()
    if json_output:
        typer.echo(orjson.dumps(result.to_wire(), option=orjson.OPT_INDENT_2).decode())
        return
    note = " (estimated: no dbstat)" if result.estimated else ""
    table = Table("location", "kind", "table", title=f"storage, {result.backend}{note}")
    table.add_column("rows", justify="right")
    table.add_column("bytes", justify="right")
    for loc in result.locations:
        table.add_row(loc.label, loc.kind_label, loc.name, f"{loc.rows:,}", f"{loc.bytes:,}")
    table.add_section()
    table.add_row("total", "", "", f"{result.total_rows:,}", f"{result.total_bytes:,}")
    table.add_row("database", "", "", "", f"{result.database_bytes:,}")
    Console(width=None if sys.stdout.isatty() else 120).print(table)


# -- events out (issue 17): webhooks and the RabbitMQ relay ---------------------------------

webhooks_app = typer.Typer(
    help="Webhook subscriptions: create, list, delete, dead letters, replay, run.",
    no_args_is_help=True,
)
app.add_typer(webhooks_app, name="webhooks")


def _webhook_admin(db: Database) -> WebhookAdmin:
    from loyalty.application.accounts import Members
    from loyalty.bootstrap import build_webhook_admin

    def head() -> int:
        from loyalty.adapters.event_store import event_store_env

        members = Members(env=event_store_env(db.settings))
        try:
            return int(members.recorder.max_notification_id() or 0)
        finally:
            members.close()

    return build_webhook_admin(db, head)


@webhooks_app.command("create")
def webhooks_create(
    url: Annotated[str, typer.Option(help="http(s) URL the events are POSTed to")],
    event_type: Annotated[
        list[str] | None,
        typer.Option("--event-type", help="deliver only these types (repeat; default: all)"),
    ] = None,
) -> None:
    """Subscribe a URL; the signing secret is printed once, as the last line."""
    db = open_database(load_settings())
    try:
        created = _webhook_admin(db).create(url, event_type or ())
    except ValueError as exc:
        raise fail(str(exc), 2) from None
    finally:
        db.dispose()
    typer.echo(f"created subscription {created.subscription_id} -> {created.url}")
    typer.echo("signing secret (Standard Webhooks; not shown again):")
    typer.echo(created.secret)


@webhooks_app.command("list")
def webhooks_list() -> None:
    """List subscriptions (never the secrets) with their cursors and dead letters."""
    from loyalty.adapters.delivery_store import SqlDeliveryStore

    db = open_database(load_settings())
    try:
        subscriptions = _webhook_admin(db).subscriptions()
        store = SqlDeliveryStore(db)
        cursors = store.cursors()
        letters = store.dead_letters()
    finally:
        db.dispose()
    table = Table("subscription_id", "url", "event_types", "position", "dead_letters")
    for s in subscriptions:
        table.add_row(
            s.subscription_id,
            s.url,
            ",".join(s.event_types) or "all",
            str(cursors.get(s.channel, 0)),
            str(sum(1 for d in letters if d.subscription_id == s.subscription_id)),
        )
    Console().print(table)


@webhooks_app.command("delete")
def webhooks_delete(
    subscription_id: Annotated[str, typer.Argument(help="the subscription to delete")],
) -> None:
    """Delete a subscription (its cursor and dead letters go with it)."""
    db = open_database(load_settings())
    try:
        deleted = _webhook_admin(db).delete(subscription_id)
    finally:
        db.dispose()
    if not deleted:
        raise fail("no such subscription", 1)
    typer.echo(f"deleted {subscription_id}")


@webhooks_app.command("dead-letters")
def webhooks_dead_letters(
    subscription: Annotated[
        str | None, typer.Option(help="only this subscription's dead letters")
    ] = None,
) -> None:
    """Deliveries that failed for the whole retry period."""
    db = open_database(load_settings())
    try:
        letters = _webhook_admin(db).dead_letters(subscription)
    finally:
        db.dispose()
    table = Table("subscription_id", "event_id", "type", "attempts", "failed_at", "last_error")
    for d in letters:
        table.add_row(
            d.subscription_id,
            d.event.id,
            d.event.type,
            str(d.attempts),
            utc_text(d.failed_at),
            d.last_error,
        )
    Console().print(table)
    typer.echo(f"{len(letters)} dead letters")


@webhooks_app.command("replay")
def webhooks_replay(
    subscription: Annotated[
        str | None, typer.Option(help="only this subscription's dead letters")
    ] = None,
) -> None:
    """Send every dead letter once more; delivered ones are deleted (exit 1 if any fail)."""
    from loyalty.bootstrap import webhook_sender

    settings = load_settings()
    db = open_database(settings)
    sender = webhook_sender(settings)
    try:
        delivered, failed = _webhook_admin(db).replay(sender, subscription)
    finally:
        sender.close()
        db.dispose()
    typer.echo(f"replayed: {delivered} delivered, {failed} still failing")
    if failed:
        raise typer.Exit(1)


@webhooks_app.command("run")
def webhooks_run() -> None:
    """Deliver webhooks in this process (while it holds the webhooks lease)."""
    from loyalty.bootstrap import build_webhook_dispatcher
    from loyalty.worker import WebhookRunner

    settings = load_settings()
    configure_logging(settings)
    db = open_database(settings, wait_seconds=STARTUP_WAIT_SECONDS, create=True)
    runner = WebhookRunner(db, build_webhook_dispatcher(db))
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda _s, _f: runner.stop())
    runner.run()
    db.dispose()


@app.command("relay")
def relay_cmd(
    amqp_url: Annotated[
        str,
        typer.Option(envvar="LOYALTY_AMQP_URL", help="the broker, amqp://user:pass@host:5672/"),
    ],
    exchange: Annotated[str, typer.Option(help="the durable topic exchange")] = "loyalty.events",
    batch: Annotated[int, typer.Option(min=1, max=10_000, help="events per cursor move")] = 500,
) -> None:
    """Relay account events to RabbitMQ (routing key = event type, persistent, publisher
    confirms; the cursor moves only after the broker confirmed)."""
    from loyalty.bootstrap import build_relay
    from loyalty.worker import run_relay

    settings = load_settings()
    configure_logging(settings)
    db = open_database(settings, wait_seconds=STARTUP_WAIT_SECONDS, create=True)
    loop = build_relay(db, amqp_url, exchange=exchange, batch_size=batch)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda _s, _f: loop.stop())
    run_relay(db, loop)
    db.dispose()


def main() -> None:
    app(prog_name="loyalty")


# Command groups in modules of their own register on ``app`` (or a sub-app above) when
# imported; each imports what it needs from this module, so they are imported last.
from loyalty.cli import expiry, reporting, rules_tools  # noqa: E402,F401

_LIST_ITEM = re.compile(r"^(?:[-*•] |\d+[.)] )")
_LITERAL = re.compile(r"``([^`]+)``")
_ROLE = re.compile(r":(?:func|class|mod|meth|attr):`~?([^`]+)`")


def tidy_help(text: str | None) -> str | None:
    """A docstring as help for a terminal: its paragraphs joined into lines the terminal
    wraps (the source's line breaks are not the reader's), list items kept one per line,
    reStructuredText literals (````x````) as 'x'. A paragraph starting with ``\b`` keeps
    its lines (click's convention)."""
    if text is None:
        return None
    paragraphs = []
    for paragraph in inspect.cleandoc(text).split("\n\n"):
        if paragraph.startswith("\b"):
            paragraphs.append(paragraph)
            continue
        lines: list[str] = []
        for line in paragraph.splitlines():
            line = line.strip()
            if lines and not _LIST_ITEM.match(line):
                lines[-1] += " " + line
            else:
                lines.append(line)
        paragraphs.append("\n".join(lines))
    joined = "\n\n".join(paragraphs)
    return _LITERAL.sub(r"'\1'", _ROLE.sub(r"'\1'", joined))


def _tidy(typer_app: typer.Typer) -> None:
    """Every command's and group's help (options' are one line each): see tidy_help."""
    info = typer_app.info
    if isinstance(info.help, str):
        info.help = tidy_help(info.help)
    for command in typer_app.registered_commands:
        doc = command.callback.__doc__ if command.callback is not None else None
        command.help = tidy_help(command.help if isinstance(command.help, str) else doc)
    for group in typer_app.registered_groups:
        if isinstance(group.help, str):
            group.help = tidy_help(group.help)
        if group.typer_instance is not None:
            _tidy(group.typer_instance)


_tidy(app)
