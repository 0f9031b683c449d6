"""``loyalty migrate``, ``serve`` and ``worker``: the schema, and the long-running
processes (the HTTP API, the pipeline worker and the jobs beside it)."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Annotated

import typer

from loyalty.adapters.migrate import migrate
from loyalty.bootstrap import build_worker, parse_shards
from loyalty.cli.common import (
    STARTUP_WAIT_SECONDS,
    configure_logging,
    database_label,
    fail,
    load_settings,
    open_database,
)
from loyalty.config import Settings
from loyalty.observability import Metrics
from loyalty.worker import build_projection_worker, start_forget_runner, start_webhook_runner


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
    forget_runner = start_forget_runner(db, metrics=metrics)
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
