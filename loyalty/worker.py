"""The worker process's runners: the background loops and threads of ``loyalty worker``
and ``serve`` (forget-me, webhooks, the relay, the projection's lease, the periodic jobs).
What they run is built in :mod:`loyalty.bootstrap`."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime

from loyalty.adapters.db import Database, fast_pool_reconnect
from loyalty.adapters.event_store import event_store_env
from loyalty.adapters.lease_keys import (
    FORGET_LEASE,
    PROJECTION_LEASE,
    RELAY_LEASE,
    WEBHOOK_LEASE,
)
from loyalty.adapters.pipeline_store import ShardLeases
from loyalty.application.accounts import Members
from loyalty.application.delivery import (
    CursorLoop,
    WebhookDispatcher,
)
from loyalty.application.erasure import ForgetService
from loyalty.application.expiry import ExpiryJob
from loyalty.application.projections import ProjectionWorker
from loyalty.application.retention import RetentionJob
from loyalty.bootstrap import (
    RETRY_ERRORS,
    build_expiry,
    build_forget_service,
    build_projection,
    build_retention,
    build_webhook_dispatcher,
    drop_dead_connections,
)
from loyalty.observability import Metrics

log = logging.getLogger(__name__)


class ForgetRunner:
    """Carries out forget requests in the background (one process at a time)."""

    def __init__(self, db: Database, service: ForgetService, interval: float = 1.0) -> None:
        self._service = service
        self._leases = ShardLeases(db)
        self._interval = interval
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                if self._leases.try_acquire(FORGET_LEASE):
                    self._service.run_pending()
            except RETRY_ERRORS as exc:
                log.warning("forget runner paused (%s)", type(exc).__name__)
            except Exception:  # a bug in one request must not stop forget-me for good
                log.exception("forget runner failed; retrying")
            self.stop_event.wait(self._interval)
        self._leases.release_all()

    def stop(self) -> None:
        self.stop_event.set()


def start_forget_runner(db: Database) -> ForgetRunner:
    """Carry out forget requests in a background thread of this process."""
    runner = ForgetRunner(db, build_forget_service(db))
    threading.Thread(target=runner.run, name="forget", daemon=True).start()
    return runner


class ProjectionLease:
    """The projection's lease: held from a successful ``try_acquire`` until ``release``
    or the end of the process. Keep a reference: the lock lives as long as this object."""

    def __init__(self, db: Database) -> None:
        self._leases = ShardLeases(db)

    def try_acquire(self) -> bool:
        return self._leases.try_acquire(PROJECTION_LEASE)

    def release(self) -> None:
        self._leases.release_all()


def projection_lease(db: Database) -> ProjectionLease:
    return ProjectionLease(db)


def build_projection_worker(
    db: Database,
    members: Members | None = None,
    *,
    poll_seconds: float = 0.2,
    batch_size: int = 500,
    metrics: Metrics | None = None,
) -> ProjectionWorker:
    fast_pool_reconnect()
    members = members or Members(env=event_store_env(db.settings))
    projection = build_projection(db, members, metrics=metrics)
    projection.batch_size = batch_size
    return ProjectionWorker(
        projection,
        try_lease=ProjectionLease(db).try_acquire,
        retry_errors=RETRY_ERRORS,
        on_error=drop_dead_connections(members),
        poll_seconds=poll_seconds,
    )


def build_retention_job(
    db: Database,
    *,
    metrics: Metrics | None = None,
    clock: Callable[[], datetime] | None = None,
    first_delay_seconds: float | None = None,
) -> RetentionJob | None:
    """The periodic retention job, or None when ``retention_interval_seconds`` is 0."""
    interval = db.settings.retention_interval_seconds
    if interval <= 0:
        return None
    return RetentionJob(
        build_retention(db, metrics=metrics),
        interval_seconds=interval,
        clock=clock or (lambda: datetime.now(UTC)),
        first_delay_seconds=first_delay_seconds,
    )


def start_retention_thread(
    db: Database, *, metrics: Metrics | None = None
) -> tuple[RetentionJob, threading.Thread] | None:
    """Start the periodic retention job in a daemon thread (None when turned off)."""
    job = build_retention_job(db, metrics=metrics)
    if job is None:
        return None
    thread = threading.Thread(target=job.run, name="retention", daemon=True)
    thread.start()
    return job, thread


def start_expiry_thread(
    db: Database, *, metrics: Metrics | None = None
) -> tuple[ExpiryJob, threading.Thread] | None:
    """Start the periodic expiry job in a daemon thread (None when turned off)."""
    interval = db.settings.expiry_interval_seconds
    if interval <= 0:
        return None
    job = ExpiryJob(build_expiry(db, metrics=metrics), interval_seconds=interval)
    thread = threading.Thread(target=job.run, name="expiry", daemon=True)
    thread.start()
    return job, thread


class WebhookRunner:
    """Runs the webhook dispatcher while this process holds the webhooks lease (one
    delivering process at a time, so a subscription's events go out in order)."""

    def __init__(self, db: Database, dispatcher: WebhookDispatcher) -> None:
        self._leases = ShardLeases(db)
        self._dispatcher = dispatcher
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                if self._leases.try_acquire(WEBHOOK_LEASE):
                    thread = threading.Thread(
                        target=self._dispatcher.run, name="webhooks", daemon=True
                    )
                    thread.start()
                    self.stop_event.wait()
                    self._dispatcher.stop()
                    thread.join(timeout=15)
                    break
            except RETRY_ERRORS as exc:
                log.warning("webhook runner paused (%s)", type(exc).__name__)
            self.stop_event.wait(2.0)
        self._leases.release_all()

    def stop(self) -> None:
        self.stop_event.set()


def start_webhook_runner(
    db: Database, members: Members | None = None, *, metrics: Metrics | None = None
) -> WebhookRunner:
    runner = WebhookRunner(db, build_webhook_dispatcher(db, members, metrics=metrics))
    threading.Thread(target=runner.run, name="webhook-runner", daemon=True).start()
    return runner


def run_relay(db: Database, loop: CursorLoop, *, poll_seconds: float = 0.2) -> None:
    """Run the relay while this process holds its lease (one relay at a time, so the
    exchange sees the events in commit order); returns when ``loop`` is stopped."""
    from loyalty.adapters.amqp_relay import RETRY_ERRORS as AMQP_ERRORS

    leases = ShardLeases(db)
    try:
        while not loop.stop_event.is_set():
            try:
                leased = leases.try_acquire(RELAY_LEASE)
            except RETRY_ERRORS as exc:
                log.warning("relay paused (%s)", type(exc).__name__)
                leased = False
            if leased:
                log.info("relay runs in this process")
                loop.run((*RETRY_ERRORS, *AMQP_ERRORS), poll_seconds)
                break
            loop.stop_event.wait(2.0)
    finally:
        leases.release_all()
        close = getattr(loop.sink, "close", None)
        if close is not None:
            close()
