"""Where member data lives, and how forget-me erases it, on both backends.

``REGISTRY`` is the one list of the locations holding a member's data: each names its
tables and the owning store's erasure function (run by ``ForgetService`` in its step, in
this order), or which other entry's erasure covers it. ``EXEMPT`` lists the tables that
hold none, with the reason. A test fails when a table is in neither, so every new store
must join the registry (and be erased) before it can land. The rest of this module is
the store of the requests, their subjects and the markers.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from loyalty.adapters import event_store, ingress_log, pending_store, pipeline_store, read_models
from loyalty.adapters.db import Database, existing_tables
from loyalty.adapters.delivery_store import SqlDeliveryStore
from loyalty.adapters.tables import forget_markers, forget_requests, forget_subjects, loyalty_meta
from loyalty.application.erasure import ERASING, STEPS, ForgetRequest, Location, Marker, Subject


@dataclass(frozen=True, slots=True)
class Registered:
    """A location of member data: its receipt key, a name an operator understands (the
    receipt shows the key beside it as the detail), its tables, and the store's erasure
    of a member from them, run in ``step`` (one of ``ERASING_STEPS``), in the order of
    ``REGISTRY`` within a step. A location erased by another's transaction or by a
    step of the request itself says so in ``erased_by`` instead."""

    key: str
    name: str
    tables: tuple[str, ...]
    step: str | None = None
    erase: Callable[[Database, Subject], dict[str, int]] | None = None
    erased_by: str = ""
    vacuum: bool = True
    """Vacuumed at the end (PostgreSQL)."""


REGISTRY: tuple[Registered, ...] = (
    # every live day partition, and (PostgreSQL) the dedup keys of the erased rows
    Registered(
        "ingress_events",
        "Ingested events",
        ("ingress_events", "ingress_keys"),
        "ingress",
        lambda db, s: {"ingress_events": ingress_log.erase_member(db, s.user_id, s.requested_at)},
        vacuum=False,
    ),
    # the ingress log on NATS JetStream (LOYALTY_INGRESS_URL=nats://, issue 31): the
    # member's messages deleted from the stream by sequence (JetStream's message delete
    # overwrites each one in its block on disk) and their de-duplication keys; 0 without
    Registered(
        "ingress_stream",
        "Ingested events in the JetStream stream (deleted, overwritten on disk)",
        ("stream_ingress_keys",),
        "ingress",
        lambda db, s: {"ingress_stream": _erase_stream(db, s.user_id, s.requested_at)},
        vacuum=False,
    ),
    Registered(
        "pipeline_caps",
        "Daily cap counters",
        ("pipeline_caps",),
        "caps",
        lambda db, s: {"pipeline_caps": pipeline_store.erase_caps(db, s.user_id)},
    ),
    Registered(  # earnings not yet recorded on the account
        "pipeline_pending",
        "Earnings not yet credited",
        ("pipeline_pending",),
        "caps",
        lambda db, s: {"pipeline_pending": pending_store.erase_member(db, s.user_id)},
    ),
    Registered(
        "event_store",
        "Account events",
        event_store.STREAM_TABLES,
        "event_store",
        lambda db, s: {"event_store": event_store.erase_stream(db, s.member_id)},
    ),
    # member_lots: the expiry index (issue 19), a read model of the account's lots
    # and member_ranks: whom the job re-qualifies
    Registered(
        "read_models",
        "Member views (balance, history, lots, rank)",
        ("member_balances", "member_history", "member_lots", "member_ranks"),
        "read_models",
        lambda db, s: read_models.erase_member(db, s.user_id),
    ),
    Registered(
        "projection_quarantine",
        "Quarantined account events",
        ("projection_quarantine",),
        erased_by="read_models",
        vacuum=False,
    ),
    # award explanations (issue 20): written with the stream's events, erased after it
    Registered(
        "award_explanations",
        "Award explanations",
        ("award_explanations",),
        erased_by="read_models",
    ),
    # events out (issue 17): dead letters of the member are erased; forget-me itself
    # adds member.forgotten notices here, deleted once each way out delivered them
    Registered(
        "delivery",
        "Webhook dead letters and notices",
        ("webhook_dead_letters", "delivery_notices"),
        "delivery",
        lambda db, s: SqlDeliveryStore(db).erase_member(s.user_id, s.request_id, s.requested_at),
    ),
    Registered(  # deleted when the request completes
        "forget_subjects",
        "Forget-me subjects",
        ("forget_subjects",),
        erased_by="the subject step (SqlErasureStore.forget_subject)",
    ),
)
"""Every location of member data, in the order the erasure runs them (see
``loyalty.application.erasure``)."""


def _erase_stream(db: Database, user_id: str, before: datetime) -> int:
    if not db.settings.ingress_url:
        return 0
    from loyalty.adapters.nats_log import jetstream_log  # the nats client only when used

    return jetstream_log(db).erase_member(user_id, before)


LOCATIONS: dict[str, tuple[str, ...]] = {r.key: r.tables for r in REGISTRY}
LOCATION_NAMES: dict[str, str] = {r.key: r.name for r in REGISTRY}
"""A name an operator understands for each location of a receipt (the receipt keeps the
location's key, shown beside it as the detail)."""
EXEMPT: dict[str, str] = {
    "alembic_version": "schema revision",
    "api_keys": "keys of services and operators, not members",
    "rule_versions": "weighting rules",
    "pipeline_checkpoints": "positions per shard",
    "projection_tracking": "positions per projection",
    "loyalty_meta": "the subject-hash salt, the member-sketch key, counters",
    "forget_markers": "salted hash and stream id only; expires with the retention window",
    "forget_requests": "receipts: request id, times, counts; no user id",
    "webhook_subscriptions": "URLs, event types and signing secrets; no member data",
    "delivery_cursors": "positions per way out (webhook subscription, relay)",
    # reporting (issue 18): kept forever, so they must not hold anything of a member
    "rollup_activity": "counts, exact sums and a keyed member sketch per day, source, type",
    "rollup_accounts": "account figures per day (forget-me adds its own change)",
    "rollup_ranks": "members per rank, changes per day",
    "rollup_origin": "positions per shard",
    "rule_compensations": "rule versions, periods and totals of compensation runs; no user id",
    "rule_version_starts": "positions per shard where each rules version took effect",
    "console_sessions": "operator console sessions: hashed id, key id, CSRF token, times",
}
SEQ_KEY = "erasure_seq"


class SqlErasureStore:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._salt: bytes | None = None
        self._pg = db.backend == "postgresql"

    def _insert(self, table: sa.Table) -> Any:
        return (postgresql.insert if self._pg else sqlite.insert)(table)

    # -- subject hash ------------------------------------------------------------------
    def _load_salt(self) -> bytes:
        if self._salt is None:
            with self._db.write() as conn:
                conn.execute(
                    self._insert(loyalty_meta)
                    .values(key="subject_salt", value=secrets.token_hex(32))
                    .on_conflict_do_nothing()
                )
                value = conn.execute(
                    sa.select(loyalty_meta.c.value).where(loyalty_meta.c.key == "subject_salt")
                ).scalar_one()
            self._salt = bytes.fromhex(value)
        return self._salt

    def subject_hash(self, user_id: str) -> str:
        return hmac.new(self._load_salt(), user_id.encode(), hashlib.sha256).hexdigest()

    # -- markers -----------------------------------------------------------------------
    def generation(self) -> int:
        """The erasure generation: bumped with every marker set to ``erasing``, in the
        marker's own transaction (read it before the markers)."""
        with self._db.read() as conn:
            value = conn.execute(
                sa.select(loyalty_meta.c.value).where(loyalty_meta.c.key == SEQ_KEY)
            ).scalar()
        return int(value or 0)

    def markers(self) -> list[Marker]:
        m = forget_markers.c
        with self._db.read() as conn:
            rows = conn.execute(
                sa.select(m.subject_hash, m.member_id, m.requested_at, m.state, m.seq)
            )
            return [Marker(r[0], r[1], _aware(r[2]), r[3], int(r[4])) for r in rows]

    def put_marker(self, marker: Marker, expires_at: datetime) -> None:
        with self._db.write() as conn:
            self._put_marker(conn, marker, expires_at)

    def _next_seq(self, conn: sa.Connection) -> int:
        conn.execute(
            self._insert(loyalty_meta).values(key=SEQ_KEY, value="0").on_conflict_do_nothing()
        )
        return int(
            conn.execute(
                sa.text(
                    "UPDATE loyalty_meta "
                    "SET value = CAST(CAST(value AS BIGINT) + 1 AS VARCHAR(20)) "
                    "WHERE key = :k RETURNING value"
                ),
                {"k": SEQ_KEY},
            ).scalar_one()
        )

    def _put_marker(self, conn: sa.Connection, marker: Marker, expires_at: datetime) -> None:
        """Upsert the marker; one set to ``erasing`` takes the next erasure generation
        (a ``done`` marker keeps its own)."""
        values: dict[str, Any] = {
            "subject_hash": marker.subject_hash,
            "member_id": marker.member_id,
            "requested_at": marker.requested_at,
            "state": marker.state,
            "expires_at": expires_at,
        }
        if marker.state == ERASING:
            values["seq"] = self._next_seq(conn)
        stmt = self._insert(forget_markers).values(**values)
        stmt = stmt.on_conflict_do_update(
            index_elements=["subject_hash"],
            set_={k: stmt.excluded[k] for k in values if k != "subject_hash"},
        )
        conn.execute(stmt)

    # -- requests ----------------------------------------------------------------------
    def create_request(
        self, user_id: str, requested_at: datetime, marker: Marker, expires_at: datetime
    ) -> str:
        """The request, its subject and its marker, in one transaction."""
        request_id = uuid.uuid4().hex
        with self._db.write() as conn:
            self._put_marker(conn, marker, expires_at)
            conn.execute(
                forget_requests.insert().values(
                    request_id=request_id,
                    status="pending",
                    step=None,
                    requested_at=requested_at,
                    erased="{}",
                )
            )
            conn.execute(forget_subjects.insert().values(request_id=request_id, user_id=user_id))
        return request_id

    @staticmethod
    def _select() -> Any:
        return sa.select(forget_requests, forget_subjects.c.user_id).outerjoin(
            forget_subjects, forget_subjects.c.request_id == forget_requests.c.request_id
        )

    @staticmethod
    def _request(row: Any) -> ForgetRequest:
        return ForgetRequest(
            row.request_id,
            row.user_id,
            row.status,
            row.step,
            _aware(row.requested_at),
            _aware(row.completed_at) if row.completed_at else None,
            orjson.loads(row.erased),
        )

    def get_request(self, request_id: str) -> ForgetRequest | None:
        with self._db.read() as conn:
            row = conn.execute(
                self._select().where(forget_requests.c.request_id == request_id)
            ).first()
        return None if row is None else self._request(row)

    def unfinished_requests(self) -> list[ForgetRequest]:
        with self._db.read() as conn:
            rows = conn.execute(
                self._select()
                .where(forget_requests.c.status != "completed")
                .order_by(forget_requests.c.requested_at)
            ).all()
        return [self._request(r) for r in rows]

    def recent_requests(self, limit: int) -> list[ForgetRequest]:
        with self._db.read() as conn:
            rows = conn.execute(
                self._select()
                .order_by(forget_requests.c.requested_at.desc(), forget_requests.c.request_id)
                .limit(limit)
            ).all()
        return [self._request(r) for r in rows]

    def record_step(self, request_id: str, step: str, erased: dict[str, int]) -> None:
        """Record ``step`` as done, only if it moves the request forward: a second runner
        (one whose lease died under it) must never move a request back to a step before
        ``subject`` once the user id is gone, nor overwrite the counts of a later step."""
        earlier = list(STEPS[: STEPS.index(step)])
        c = forget_requests.c
        with self._db.write() as conn:
            conn.execute(
                forget_requests.update()
                .where(c.request_id == request_id, c.status != "completed")
                .where(sa.or_(c.step.is_(None), c.step.in_(earlier)))
                .values(step=step, status="running", erased=orjson.dumps(erased).decode())
            )

    def forget_subject(self, request_id: str) -> None:
        """Delete the request's user id (rows here are never updated, only deleted)."""
        with self._db.write() as conn:
            conn.execute(forget_subjects.delete().where(forget_subjects.c.request_id == request_id))

    def complete(self, request_id: str, completed_at: datetime, erased: dict[str, int]) -> None:
        """Finish the receipt."""
        with self._db.write() as conn:
            conn.execute(
                forget_requests.update()
                .where(forget_requests.c.request_id == request_id)
                .values(
                    step="done",
                    status="completed",
                    completed_at=completed_at,
                    erased=orjson.dumps(erased).decode(),
                )
            )
            conn.execute(forget_subjects.delete().where(forget_subjects.c.request_id == request_id))

    # -- locations ---------------------------------------------------------------------
    def locations(self) -> list[Location]:
        return [
            Location(r.key, r.step, partial(r.erase, self._db))
            for r in REGISTRY
            if r.step is not None and r.erase is not None
        ]

    def vacuum(self) -> None:
        """Make deleted rows physically go away. PostgreSQL: VACUUM (the library turns
        autovacuum down on its events table). SQLite: secure_delete zeroed the cells;
        checkpoint the WAL so no old page copy remains there either."""
        if self._pg:
            with self._db.engine.connect() as conn:
                conn = conn.execution_options(isolation_level="AUTOCOMMIT")
                tables = existing_tables(conn, [t for r in REGISTRY if r.vacuum for t in r.tables])
                conn.execute(sa.text("VACUUM " + ", ".join(f'"{t}"' for t in tables)))
            return
        raw = self._db.engine.raw_connection()
        try:  # outside any transaction; read every result row so each pragma completes
            raw.driver_connection.execute("PRAGMA incremental_vacuum").fetchall()  # type: ignore[union-attr]
            raw.driver_connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()  # type: ignore[union-attr]
        finally:
            raw.close()


def _aware(value: Any) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
