"""The composition root: builds the use cases of every process (API, worker, CLI) from
the adapters, in one place. Nothing else wires adapters to use cases; nothing here runs at
import time (each builder is called by an entrypoint)."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, cast

import psycopg
import sqlalchemy as sa
from eventsourcing.persistence import PersistenceError

from loyalty.adapters.compensation_store import CompensationStore
from loyalty.adapters.console_sessions import ConsoleSessions
from loyalty.adapters.db import Database, DatabaseUnavailable, fast_pool_reconnect
from loyalty.adapters.delivery_store import RELAY_CHANNEL, SqlDeliveryStore
from loyalty.adapters.erasure_store import SqlErasureStore
from loyalty.adapters.event_store import (
    event_store_env,
    notification_reader,
    plain_decoder,
    stream_connection,
    stream_loader,
    worker_env,
)
from loyalty.adapters.expiry_store import ExpiryLease, MemberLots
from loyalty.adapters.explanation_store import ExplanationStore
from loyalty.adapters.ingress_log import (
    PostgresIngressLog,
    SqliteIngressLog,
    create_ingress_log,
    pending_stats,
)
from loyalty.adapters.keys import KeyStore
from loyalty.adapters.pending_store import PendingTable
from loyalty.adapters.pipeline_store import PipelineStore, ShardLeases
from loyalty.adapters.read_models import ReadModels
from loyalty.adapters.retention_store import create_retention_store
from loyalty.adapters.rollup_store import RollupStore
from loyalty.adapters.rules_store import RulesStore
from loyalty.adapters.storage import StorageReport, storage_report
from loyalty.adapters.webhook_sender import HttpWebhookSender, check_url
from loyalty.application.access import Principal
from loyalty.application.accounts import Accounts, Members, Spending
from loyalty.application.accounts.views import MemberViews
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
from loyalty.application.expiry import Expiry
from loyalty.application.explain import Explanations
from loyalty.application.ingress import IngestService
from loyalty.application.pipeline import LagProbe, Pipeline, Worker
from loyalty.application.pipeline_status import PipelineStatus
from loyalty.application.projections import MemberProjection
from loyalty.application.reporting import DayReport, RollupReader, daily_report
from loyalty.application.retention import Retention, RetentionStore
from loyalty.application.rule_book import RuleBook
from loyalty.config import Settings
from loyalty.domain.errors import MemberBeingErased
from loyalty.observability import Metrics

if TYPE_CHECKING:  # imported where used: the nats client only where the log is on NATS
    from loyalty.adapters.nats_log import JetStreamIngressLog

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


def ingress_log(db: Database) -> PostgresIngressLog | SqliteIngressLog | JetStreamIngressLog:
    """The ingress (activity) log: the database's, or with ``LOYALTY_INGRESS_URL=nats://``
    a JetStream stream (its de-duplication keys stay in the database)."""
    if db.settings.ingress_url:
        from loyalty.adapters.nats_log import jetstream_log

        return jetstream_log(db)
    return create_ingress_log(db)


def readiness(
    db: Database, log: PostgresIngressLog | SqliteIngressLog | JetStreamIngressLog
) -> Callable[[], None]:
    """``/readyz``: raises unless the database answers, and the JetStream stream too when
    the activity log is there (a batch needs both)."""
    if not db.settings.ingress_url:
        return db.ping
    stream = cast("JetStreamIngressLog", log)  # what ingress_log(db) built for this URL

    def ready() -> None:
        db.ping()
        stream.ping()

    return ready


def backlog_of(
    db: Database,
) -> Callable[[Mapping[int, tuple[int, int]]], tuple[int, datetime | None]]:
    """Ingress events past the given checkpoints, and when the oldest arrived."""
    if db.settings.ingress_url:
        from loyalty.adapters.nats_log import jetstream_log

        stream = jetstream_log(db)
        return lambda positions: stream.pending_stats(dict(positions))
    return lambda positions: pending_stats(db, dict(positions), db.settings.shard_count)


def build_dry_run(
    db: Database,
    settings: Settings,
    rules: RulesStore | None = None,
    clock: Callable[[], datetime] | None = None,
) -> DryRun:
    """The rule dry run over this database's retained ingress (read-only)."""
    return DryRun(
        ingress_log(db),
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


def streaming_accounts(db: Database, members: Members) -> Accounts:
    """The accounts of a batch process (pipeline, expiry): members loaded by streaming
    their events (and snapshot) rather than one query each, behind the erasure guard."""
    return Accounts(
        members,
        lambda app: stream_loader(
            app.recorder, app.snapshots.recorder if app.snapshots is not None else None
        ),
        markers=marker_cache(db),
        pending=PendingTable(db),
    )


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
        ingress_log(db),
        PipelineStore(db),
        RulesStore(db),
        streaming_accounts(db, members),
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


def build_pipeline_status(
    db: Database, clock: Callable[[], datetime] | None = None
) -> PipelineStatus:
    """How far the pipeline has got: its backlog (the lag gauge) and its totals."""
    state = PipelineStore(db)
    return PipelineStatus(
        state,
        backlog_of(db),
        ReadModels(db).quarantined_count,
        clock or (lambda: datetime.now(UTC)),
    )


def lag_probe(db: Database) -> LagProbe:
    """Pending ingress events (all shards) and the age of the oldest, in seconds."""
    return build_pipeline_status(db).backlog


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


def build_projection(
    db: Database, members: Members | None = None, *, metrics: Metrics | None = None
) -> MemberProjection:
    fast_pool_reconnect()
    members = members or Members(env=event_store_env(db.settings))
    return MemberProjection(
        members,
        ReadModels(db),
        metrics=metrics,
        retry_errors=RETRY_ERRORS,
        select=notification_reader(members.recorder),
    )


def build_retention(db: Database, *, metrics: Metrics | None = None) -> Retention:
    """Retention over this database (the lease keeps two processes from running it at
    once)."""
    store: RetentionStore = create_retention_store(db)
    if db.settings.ingress_url:  # the stream expires by max_age; keys and the hold here
        from loyalty.adapters.nats_log import jetstream_log
        from loyalty.adapters.nats_retention import JetStreamRetentionStore

        store = JetStreamRetentionStore(db, jetstream_log(db), create_retention_store(db))
    return Retention(store, retention_days=db.settings.retention_days, metrics=metrics)


def build_expiry(
    db: Database, members: Members | None = None, *, metrics: Metrics | None = None
) -> Expiry:
    """The expiry job over this database (one run at a time: its lease)."""
    members = members or Members(env=worker_env(db.settings))
    rules = RulesStore(db)
    return Expiry(
        streaming_accounts(db, members),
        MemberLots(db),
        rules.current,
        ExpiryLease(db),
        metrics=metrics,
    )


def event_feed(app: Members, erasure: SqlDeliveryStore | None = None) -> EventFeed:
    """The feed over ``app``'s notification log; a page's members not in its cache are
    looked up in one read (``erasure``: events of members erased while a page was read
    are dropped)."""
    return EventFeed(
        app.recorder,
        app.mapper,
        app,
        erasure,
        first_events=stream_loader(app.recorder, first_only=True),
        decode=plain_decoder(app),
        select=notification_reader(app.recorder),
    )


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
                    built.append(event_feed(accounts.app, erasure))
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
        return event_feed(apps[0])

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
        event_feed(members, SqlDeliveryStore(db)),
        SqlDeliveryStore(db),
        AmqpSink(amqp_url, exchange, erasure=SqlDeliveryStore(db)),
        batch_size=batch_size,
        metrics=metrics,
    )


# -- the API (and the console it serves) ---------------------------------------------------


@dataclass
class ApiServices:
    """What the API's routes and the console's pages are given: use cases, and (for the
    console until it moves onto use cases) the adapters it still reaches."""

    settings: Settings
    clock: Callable[[], datetime]
    metrics: Metrics
    # use cases
    ingest: IngestService
    accounts: Accounts
    spending: Spending
    members: MemberViews
    rule_book: RuleBook
    pipeline: PipelineStatus
    forget: ForgetService
    feed: Callable[[], EventFeed]
    """The account event feed (built on first use, like the event store application)."""
    webhooks: WebhookAdmin
    explanations: Explanations
    """Award explanations (issue 20)."""
    dry_run: DryRun
    """Rule dry runs (issue 20)."""
    daily_report: Callable[[date, date], list[DayReport]]
    """``GET /v1/reports/daily``: the report from the rollups."""
    storage: Callable[[], StorageReport]
    """Rows and bytes per storage location."""
    ready: Callable[[], None]
    """Raises unless the database (and a JetStream activity log) answers (``/readyz``)."""
    verify_key: Callable[[str], Principal | None]
    """The principal of a presented API key (None: unknown or revoked)."""
    webhook_sender: Callable[[], HttpWebhookSender]
    """A sender for replaying dead letters (a new one per replay; closed after it)."""
    # adapters the console still reaches directly (the API's routes do not)
    db: Database
    keys: KeyStore
    rules: RulesStore
    pipeline_state: PipelineStore
    read_models: ReadModels
    rollups: RollupReader
    """The daily rollups."""
    console_sessions: ConsoleSessions


def build_api_services(
    settings: Settings,
    *,
    db: Database | None = None,
    clock: Callable[[], datetime] | None = None,
    members: Members | None = None,
    metrics: Metrics | None = None,
) -> ApiServices:
    """The use cases of one API process (``members``: a shared event store application;
    else one is built on first use, so the API starts while its database is down)."""
    db = db or Database(settings)
    now = clock or (lambda: datetime.now(UTC))
    env = event_store_env(settings)
    markers = marker_cache(db)
    accounts: Accounts
    # a member read reads the pending row on the event store's connections
    connect = (lambda: stream_connection(accounts.app)) if db.backend == "postgresql" else None
    accounts = Accounts(
        members or (lambda: Members(env=env)),
        markers=markers,
        pending=PendingTable(db, connect),
    )
    rules = RulesStore(db)
    metrics = metrics if metrics is not None else Metrics()
    feed = feed_factory(accounts, db)
    spending = Spending(
        accounts,
        metrics,
        ranks=lambda: rules.current().ranks,
        expiry=lambda: rules.current().currency_expiry,
        clock=now,
    )
    read_models = ReadModels(db)
    rollups = RollupStore(db)
    keys = KeyStore(db, settings.auth_cache_seconds)
    activity = ingress_log(db)
    return ApiServices(
        settings=settings,
        clock=now,
        metrics=metrics,
        ingest=IngestService(
            activity,
            clock=now,
            retention=timedelta(days=settings.retention_days),
            future_skew=timedelta(seconds=settings.future_skew_seconds),
            shard_count=settings.shard_count,
            metrics=metrics,
            forgotten_at=markers.forgotten_at,
            weighed_types=lambda: rules.current().rules.keys(),
        ),
        accounts=accounts,
        spending=spending,
        members=MemberViews(accounts, spending, rules, read_models, now),
        rule_book=RuleBook(rules, now),
        pipeline=build_pipeline_status(db, now),
        forget=build_forget_service(db, accounts, clock=now),
        feed=feed,
        webhooks=build_webhook_admin(db, lambda: feed().head()),
        explanations=Explanations(ExplanationStore(db), carried_fraction(accounts)),
        dry_run=build_dry_run(db, settings, rules, now),
        daily_report=lambda first, last: daily_report(
            rollups, first, last, rules.current().rules.keys()
        ),
        storage=lambda: storage_report(db),
        ready=readiness(db, activity),
        verify_key=keys.verify,
        webhook_sender=lambda: webhook_sender(settings),
        db=db,
        keys=keys,
        rules=rules,
        pipeline_state=PipelineStore(db),
        read_models=read_models,
        rollups=rollups,
        console_sessions=ConsoleSessions(db, timedelta(minutes=settings.console_session_minutes)),
    )


def carried_fraction(accounts: Accounts) -> Callable[[str], tuple[Decimal, Decimal]]:
    """The fraction a member's account carries (for a pending award's explanation)."""

    def carried(user_id: str) -> tuple[Decimal, Decimal]:
        member = accounts.get(user_id)
        return member.fraction_currency, member.fraction_rank_points

    return carried
