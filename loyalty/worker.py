"""Composition root of the pipeline worker and the read-model projection (embedded in
``serve`` or standalone)."""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial

import psycopg
import sqlalchemy as sa
from eventsourcing.persistence import PersistenceError

from loyalty.adapters.compensation_store import CompensationStore
from loyalty.adapters.db import Database, DatabaseUnavailable, fast_pool_reconnect
from loyalty.adapters.delivery_store import RELAY_CHANNEL, SqlDeliveryStore
from loyalty.adapters.erasure_store import SqlErasureStore
from loyalty.adapters.event_store import event_store_env, stream_loader, worker_env
from loyalty.adapters.expiry_store import ExpiryLease, MemberLots
from loyalty.adapters.ingress_log import create_ingress_log, pending_stats
from loyalty.adapters.lease_keys import (
    FORGET_LEASE,
    PROJECTION_LEASE,
    RELAY_LEASE,
    WEBHOOK_LEASE,
)
from loyalty.adapters.pending_store import PendingTable
from loyalty.adapters.pipeline_store import PipelineStore, ShardLeases
from loyalty.adapters.read_models import ReadModels
from loyalty.adapters.retention_store import create_retention_store
from loyalty.adapters.rules_store import RulesStore
from loyalty.adapters.webhook_sender import HttpWebhookSender, check_url
from loyalty.application.accounts import Accounts, Members, Spending
from loyalty.application.compensation import Compensation
from loyalty.application.delivery import (
    CursorLoop,
    EventFeed,
    RetryPolicy,
    WebhookAdmin,
    WebhookDispatcher,
    WebhookSender,
)
from loyalty.application.dryrun import DryRun
from loyalty.application.erasure import ForgetService, MarkerCache
from loyalty.application.expiry import Expiry, ExpiryJob
from loyalty.application.jobs import JobRunner
from loyalty.application.pipeline import LagProbe, Pipeline, Worker
from loyalty.application.projections import MemberProjection, ProjectionWorker
from loyalty.application.retention import Retention, RetentionJob
from loyalty.config import Settings
from loyalty.domain.errors import MemberBeingErased
from loyalty.observability import Metrics

log = logging.getLogger(__name__)

RETRY_ERRORS: tuple[type[BaseException], ...] = (
    sa.exc.OperationalError,
    sa.exc.InterfaceError,
    sa.exc.TimeoutError,
    DatabaseUnavailable,
    PersistenceError,
    psycopg.OperationalError,  # raised unwrapped where we use the driver directly (COPY)
    psycopg.InterfaceError,
    MemberBeingErased,  # a forget-me is under way: retry the window when it is done
)


def build_dry_run(
    db: Database,
    settings: Settings,
    rules: RulesStore | None = None,
    clock: Callable[[], datetime] | None = None,
) -> DryRun:
    """The rule dry run over this database's retained ingress (read-only)."""
    return DryRun(
        create_ingress_log(db),
        rules or RulesStore(db),
        ReadModels(db).rank_points_of,
        retention_days=settings.retention_days,
        shard_count=settings.shard_count,
        clock=clock or (lambda: datetime.now(UTC)),
        duty=settings.dry_run_duty,
    )


def build_compensation(
    db: Database,
    members: Members | None = None,
    crash_hook: Callable[[str], None] | None = None,
) -> Compensation:
    """``loyalty rules apply --compensate``: the accounts' adjustments (behind the
    erasure guard), the dry run's weighing, where each version took effect per shard,
    the runs' table and their explanations."""
    members = members or Members(env=event_store_env(db.settings))
    markers = marker_cache(db)
    accounts = Accounts(members, markers=markers, pending=PendingTable(db))
    rules = RulesStore(db)
    return Compensation(
        rules,
        CompensationStore(db),
        build_dry_run(db, db.settings, rules),
        Spending(accounts, ranks=lambda: rules.current().ranks),
        PipelineStore(db),
        markers,
        shard_count=db.settings.shard_count,
        clock=lambda: datetime.now(UTC),
        crash_hook=crash_hook,
    )


def parse_shards(spec: str, shard_count: int) -> list[int]:
    """'0-7', '3', '0-3,8-11' or 'all' -> shard numbers (validated)."""
    if spec.strip() == "all":
        return list(range(shard_count))
    shards: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ValueError(f"bad shard range {part!r}: use N, N-M or all")
        first, last = int(lo), int(hi or lo)
        if first > last or last >= shard_count:
            raise ValueError(f"shards must lie in 0-{shard_count - 1}: {part!r}")
        shards.update(range(first, last + 1))
    return sorted(shards)


def build_pipeline(
    db: Database,
    members: Members | None = None,
    *,
    metrics: Metrics | None = None,
    rollups: bool = True,
) -> Pipeline:
    settings = db.settings
    fast_pool_reconnect()
    members = members or Members(env=worker_env(settings))
    markers = marker_cache(db)
    return Pipeline(
        create_ingress_log(db),
        PipelineStore(db),
        RulesStore(db),
        Accounts(
            members,
            lambda app: stream_loader(
                app.recorder, app.snapshots.recorder if app.snapshots is not None else None
            ),
            markers=markers,
            pending=PendingTable(db),
        ),
        chunk=settings.pipeline_chunk,
        interval_seconds=settings.award_interval_seconds,
        metrics=metrics,
        forgotten_at=markers.forgotten_at,
        forgotten_any=markers.any,
        rollups=rollups,  # off only in the benchmark that measures their cost
    )


def drop_dead_connections(members: Members) -> Callable[[], None]:
    """After a database error: test every idle connection of the event store's pool and
    replace the dead ones at once (psycopg_pool's ``check``). Without it, after a restart
    each checkout finds one dead connection and backs off before the next (seconds)."""

    def check() -> None:
        pool = getattr(getattr(members.recorder, "datastore", None), "pool", None)
        if pool is not None:
            pool.check()

    return check


_MARKER_CACHES: weakref.WeakKeyDictionary[Database, MarkerCache] = weakref.WeakKeyDictionary()


def marker_cache(db: Database) -> MarkerCache:
    """The process's one view of the forget markers on ``db``: shared by the accounts
    (API, pipeline) and the forget runner, so an erasure run here is seen at once."""
    found = _MARKER_CACHES.get(db)
    if found is None:
        found = MarkerCache(SqlErasureStore(db), refresh=db.settings.marker_refresh_seconds)
        _MARKER_CACHES[db] = found
    return found


def build_forget_service(
    db: Database, accounts: Accounts | None = None, *, clock: Callable[[], datetime] | None = None
) -> ForgetService:
    settings = db.settings
    return ForgetService(
        SqlErasureStore(db),
        clock=clock or (lambda: datetime.now(UTC)),
        marker_ttl=timedelta(days=settings.retention_days, hours=1),
        settle=timedelta(seconds=settings.forget_settle_seconds),
        evict=accounts.evict if accounts is not None else (lambda _user_id: None),
        markers_changed=marker_cache(db).invalidate,
    )


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


def lag_probe(db: Database) -> LagProbe:
    """Pending ingress events (all shards) and the age of the oldest, in seconds."""
    state = PipelineStore(db)

    def probe() -> tuple[int, float | None]:
        pending, oldest = pending_stats(db, state.positions(), db.settings.shard_count)
        if oldest is None:
            return pending, None
        if oldest.tzinfo is None:  # SQLite gives naive UTC times back
            oldest = oldest.replace(tzinfo=UTC)
        return pending, max(0.0, (datetime.now(UTC) - oldest).total_seconds())

    return probe


def build_worker(
    db: Database,
    shards: list[int],
    members: Members | None = None,
    *,
    metrics: Metrics | None = None,
) -> Worker:
    leases = ShardLeases(db)
    members = members or Members(env=worker_env(db.settings))
    return Worker(
        build_pipeline(db, members, metrics=metrics),
        shards,
        window_seconds=db.settings.award_window_seconds,
        try_lease=leases.try_acquire,
        held_leases=leases.held,
        on_error=drop_dead_connections(members),
        retry_errors=RETRY_ERRORS,
        lag_probe=lag_probe(db) if metrics is not None else None,
    )


# Lease key of the member projection: beyond any shard number (shard_count <= 1024), so
# it shares ShardLeases' mechanism (advisory lock / lock file) without colliding.


def build_projection(
    db: Database, members: Members | None = None, *, metrics: Metrics | None = None
) -> MemberProjection:
    fast_pool_reconnect()
    members = members or Members(env=event_store_env(db.settings))
    return MemberProjection(members, ReadModels(db), metrics=metrics, retry_errors=RETRY_ERRORS)


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


# -- retention (periodic in the worker; `loyalty retention run` on demand) ----------------


def build_retention(db: Database, *, metrics: Metrics | None = None) -> Retention:
    """Retention over this database (the lease keeps two processes from running it at
    once)."""
    return Retention(
        create_retention_store(db), retention_days=db.settings.retention_days, metrics=metrics
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


# -- currency expiry (periodic in the worker; `loyalty expiry run` on demand) -------------


def build_expiry(
    db: Database, members: Members | None = None, *, metrics: Metrics | None = None
) -> Expiry:
    """The expiry job over this database (one run at a time: its lease)."""
    members = members or Members(env=worker_env(db.settings))
    rules = RulesStore(db)
    accounts = Accounts(
        members,
        lambda app: stream_loader(
            app.recorder, app.snapshots.recorder if app.snapshots is not None else None
        ),
        markers=marker_cache(db),
        pending=PendingTable(db),
    )
    return Expiry(accounts, MemberLots(db), rules.current, ExpiryLease(db), metrics=metrics)


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


# -- events out (feed, webhooks; the relay is `loyalty relay`) -----------------------------


def feed_factory(accounts: Accounts, db: Database | None = None) -> Callable[[], EventFeed]:
    """The feed over ``accounts``' event store application, built on first use (with
    ``db``: dropping events of members erased while a page was read)."""
    built: list[EventFeed] = []
    lock = threading.Lock()
    erasure = SqlDeliveryStore(db) if db is not None else None

    def get() -> EventFeed:
        if not built:
            with lock:
                if not built:
                    app = accounts.app
                    built.append(EventFeed(app.recorder, app.mapper, app, erasure))
        return built[0]

    return get


def build_webhook_admin(db: Database, head: Callable[[], int]) -> WebhookAdmin:
    settings = db.settings
    return WebhookAdmin(
        SqlDeliveryStore(db),
        head,
        lambda url: check_url(url, allow_private=settings.webhook_allow_private_urls),
        erasure=SqlDeliveryStore(db),
    )


def webhook_sender(settings: Settings) -> HttpWebhookSender:
    return HttpWebhookSender(
        timeout=settings.webhook_timeout_seconds,
        allow_private=settings.webhook_allow_private_urls,
    )


def build_webhook_dispatcher(
    db: Database,
    members: Members | None = None,
    *,
    metrics: Metrics | None = None,
    refresh: float = 2.0,
    poll_seconds: float = 0.2,
    policy: RetryPolicy | None = None,
    max_pause: float = 30.0,
    sender: WebhookSender | None = None,
) -> WebhookDispatcher:
    """One delivery loop per subscription, each with its own feed reader. The event store
    application is built on first use (a worker starts while the database is down)."""
    settings = db.settings
    apps: list[Members] = [members] if members is not None else []

    def feed() -> EventFeed:
        if not apps:
            apps.append(Members(env=event_store_env(settings)))
        # no erasure check here: each sink asks for its batch right before sending
        return EventFeed(apps[0].recorder, apps[0].mapper, apps[0])

    return WebhookDispatcher(
        feed,
        SqlDeliveryStore(db),
        SqlDeliveryStore(db),
        sender or webhook_sender(settings),
        policy=policy or RetryPolicy(give_up_after=settings.webhook_retry_seconds),
        retry_errors=RETRY_ERRORS,
        metrics=metrics,
        refresh=refresh,
        poll_seconds=poll_seconds,
        erasure=SqlDeliveryStore(db),
        max_pause=max_pause,
        # an erasure completes no sooner than the settle time after its marker is set
        recheck_after=min(0.25, settings.forget_settle_seconds / 4),
    )


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


def build_relay(
    db: Database,
    amqp_url: str,
    *,
    exchange: str = "loyalty.events",
    batch_size: int = 500,
    members: Members | None = None,
    metrics: Metrics | None = None,
) -> CursorLoop:
    """The RabbitMQ relay: the feed from the ``relay`` cursor to a topic exchange."""
    from loyalty.adapters.amqp_relay import AmqpSink

    members = members or Members(env=event_store_env(db.settings))
    return CursorLoop(
        RELAY_CHANNEL,
        EventFeed(members.recorder, members.mapper, members, SqlDeliveryStore(db)),
        SqlDeliveryStore(db),
        AmqpSink(amqp_url, exchange, erasure=SqlDeliveryStore(db)),
        batch_size=batch_size,
        metrics=metrics,
    )


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
