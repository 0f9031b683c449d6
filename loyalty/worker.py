"""The worker process's runners: the background loops and threads of ``loyalty worker``
and ``serve`` (forget-me, webhooks, the relay, the projection's lease, the periodic jobs).
What they run is built in :mod:`loyalty.bootstrap`."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial

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
from loyalty.application.jobs import JobRunner
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


class ForgetRunner(JobRunner):
    """Carries out forget requests in the background, on the job runner, while this
    process holds the forget-me lease (one process at a time)."""

    def __init__(
        self,
        db: Database,
        service: ForgetService,
        interval: float = 1.0,
        *,
        metrics: Metrics | None = None,
    ) -> None:
        leases = ShardLeases(db)
        super().__init__(
            "forget",
            self._once,
            interval=interval,
            try_lease=partial(leases.try_acquire, FORGET_LEASE),
            release_lease=leases.release_all,
            lease_retry=interval,
            retry_errors=RETRY_ERRORS,
            metrics=metrics,
            logger=log,
        )
        self._service = service

    def _once(self) -> None:
        self._service.run_pending()


def start_forget_runner(db: Database, *, metrics: Metrics | None = None) -> ForgetRunner:
    """Carry out forget requests in a background thread of this process."""
    runner = ForgetRunner(db, build_forget_service(db), metrics=metrics)
    runner.start()
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
    job.metrics, job.retry_errors = metrics, RETRY_ERRORS
    return job, job.start()


def start_expiry_thread(
    db: Database, *, metrics: Metrics | None = None
) -> tuple[ExpiryJob, threading.Thread] | None:
    """Start the periodic expiry job in a daemon thread (None when turned off)."""
    interval = db.settings.expiry_interval_seconds
    if interval <= 0:
        return None
    job = ExpiryJob(build_expiry(db, metrics=metrics), interval_seconds=interval, metrics=metrics)
    job.retry_errors = RETRY_ERRORS
    return job, job.start()


class WebhookRunner:
    """Runs the webhook dispatcher on the job runner while this process holds the
    webhooks lease (one delivering process at a time, so a subscription's events go out
    in order); losing the lease stops the delivery loops until it is held again."""

    def __init__(self, db: Database, dispatcher: WebhookDispatcher) -> None:
        leases = ShardLeases(db)
        self.job = dispatcher.runner(
            try_lease=partial(leases.try_acquire, WEBHOOK_LEASE),
            release_lease=leases.release_all,
        )
        self.stop_event = self.job.stop_event

    def run(self) -> None:
        self.job.run()

    def stop(self) -> None:
        self.job.stop()


def start_webhook_runner(
    db: Database, members: Members | None = None, *, metrics: Metrics | None = None
) -> WebhookRunner:
    runner = WebhookRunner(db, build_webhook_dispatcher(db, members, metrics=metrics))
    runner.job.start("webhook-runner")
    return runner


def run_relay(db: Database, loop: CursorLoop, *, poll_seconds: float = 0.2) -> None:
    """Run the relay while this process holds its lease (one relay at a time, so the
    exchange sees the events in commit order); returns when ``loop`` is stopped."""
    from loyalty.adapters.amqp_relay import RETRY_ERRORS as AMQP_ERRORS

    leases = ShardLeases(db)
    close = getattr(loop.sink, "close", None)
    loop.runner(
        (*RETRY_ERRORS, *AMQP_ERRORS),
        poll_seconds,
        try_lease=partial(leases.try_acquire, RELAY_LEASE),
        release_lease=leases.release_all,
        on_end=close,
    ).run()
