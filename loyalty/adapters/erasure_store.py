"""Where member data lives, and how forget-me erases it, on both backends.

``LOCATIONS`` is the one registry of tables holding a member's data; ``EXEMPT`` lists the
tables that hold none, with the reason. A test fails when a table is in neither, so every
new store must join the registry (and be erased) before it can land.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from loyalty.adapters.db import Database
from loyalty.adapters.rollup_store import RollupStore
from loyalty.adapters.tables import metadata
from loyalty.application.erasure import ERASING, STEPS, ForgetRequest, Marker
from loyalty.application.projections import TOMBSTONE as TOMBSTONE_TOPIC
from loyalty.application.reporting import forgotten_day
from loyalty.domain.member import Member

# location name -> tables it erases the member from
LOCATIONS: dict[str, tuple[str, ...]] = {
    # every live day partition, and (PostgreSQL) the dedup keys of the erased rows
    "ingress_events": ("ingress_events", "ingress_keys"),
    "pipeline_caps": ("pipeline_caps",),
    "pipeline_pending": ("pipeline_pending",),  # earnings not yet recorded on the account
    "event_store": ("members_events", "stored_events", "members_snapshots", "stored_snapshots"),
    # member_lots: the expiry index (issue 19), a read model of the account's lots
    # and member_ranks: whom the job re-qualifies
    "read_models": ("member_balances", "member_history", "member_lots", "member_ranks"),
    "projection_quarantine": ("projection_quarantine",),  # erased with the read models
    "forget_subjects": ("forget_subjects",),  # deleted when the request completes
    # events out (issue 17): dead letters of the member are erased; forget-me itself
    # adds member.forgotten notices here, deleted once each way out delivered them
    "delivery": ("webhook_dead_letters", "delivery_notices"),
    # award explanations (issue 20): written with the stream's events, erased after it
    "award_explanations": ("award_explanations",),
}
LOCATION_NAMES: dict[str, str] = {
    "ingress_events": "Ingested events",
    "pipeline_caps": "Daily cap counters",
    "pipeline_pending": "Earnings not yet credited",
    "event_store": "Account events",
    "read_models": "Member views (balance, history, lots, rank)",
    "projection_quarantine": "Quarantined account events",
    "forget_subjects": "Forget-me subjects",
    "delivery": "Webhook dead letters and notices",
    "award_explanations": "Award explanations",
}
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
NIL_HEX = uuid.UUID(int=0).hex
SEQ_KEY = "erasure_seq"

forget_requests = sa.Table(
    "forget_requests",
    metadata,
    sa.Column("request_id", sa.String(32), primary_key=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("step", sa.String(32)),
    sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("completed_at", sa.DateTime(timezone=True)),
    sa.Column("erased", sa.Text, nullable=False),
    sa.Index("forget_requests_status_idx", "status"),
)
forget_subjects = sa.Table(
    "forget_subjects",
    metadata,
    sa.Column("request_id", sa.String(32), primary_key=True),
    sa.Column("user_id", sa.String(128), nullable=False),
)
forget_markers = sa.Table(
    "forget_markers",
    metadata,
    sa.Column("subject_hash", sa.String(64), primary_key=True),
    sa.Column("member_id", sa.String(36), nullable=False),
    sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    # the erasure generation (loyalty_meta 'erasure_seq') the marker was set at
    sa.Column("seq", sa.BigInteger, nullable=False, server_default="0"),
    sa.Index("forget_markers_member_idx", "member_id"),
)
loyalty_meta = sa.Table(
    "loyalty_meta",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)


def _utc_text(moment: datetime) -> str:
    from loyalty.adapters.ingress_log import sqlite_timestamp

    return sqlite_timestamp(moment)


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
    def erase_ingress(self, user_id: str, before: datetime) -> int:
        with self._db.write() as conn:
            if self._pg:
                # the rows' dedup keys too (an event id may carry the user's data); the
                # forget marker refuses a resend of them while it lives
                result = conn.execute(
                    sa.text(
                        "WITH gone AS (DELETE FROM ingress_events "
                        "WHERE user_id = :u AND occurred_at <= :t RETURNING source, event_id), "
                        "keys AS (DELETE FROM ingress_keys k USING gone "
                        "WHERE k.source = gone.source AND k.event_id = gone.event_id) "
                        "SELECT count(*) FROM gone"
                    ),
                    {"u": user_id, "t": before},
                )
                return int(result.scalar_one())
            else:
                result = conn.execute(
                    sa.text("DELETE FROM ingress_events WHERE user_id = :u AND occurred_at <= :t"),
                    {"u": user_id, "t": _utc_text(before)},
                )
            return int(result.rowcount)

    def erase_caps(self, user_id: str) -> int:
        with self._db.write() as conn:
            result = conn.execute(
                sa.text("DELETE FROM pipeline_caps WHERE user_id = :u"), {"u": user_id}
            )
            return int(result.rowcount)

    def erase_pending(self, user_id: str) -> int:
        """Delete the member's pending earnings. After the marker (state erasing) is
        committed; a pipeline commit already under way is waited for (its checkpoint
        row locks, taken here too on PostgreSQL; SQLite's write lock), and every later
        one refuses contributions of a member being erased (``pending_store.merge``)."""
        with self._db.write() as conn:
            if self._pg:
                conn.execute(
                    sa.text("SELECT shard FROM pipeline_checkpoints ORDER BY shard FOR UPDATE")
                )
            result = conn.execute(
                sa.text("DELETE FROM pipeline_pending WHERE user_id = :u"), {"u": user_id}
            )
            return int(result.rowcount)

    def _existing(self, conn: sa.Connection, names: tuple[str, ...]) -> list[str]:
        return [n for n in names if sa.inspect(conn).has_table(n)]

    def erase_stream(self, member_id: str) -> int:
        erased = 0
        with self._db.write() as conn:
            tables = self._existing(conn, LOCATIONS["event_store"])
            if self._pg:
                for table in tables:
                    result = conn.execute(
                        sa.text(f'DELETE FROM "{table}" WHERE originator_id = :m'),
                        {"m": uuid.UUID(member_id)},
                    )
                    erased += int(result.rowcount)
                return erased
            for table in tables:
                hex_id = uuid.UUID(member_id).hex
                if table.endswith("_snapshots"):
                    # The library's snapshot table is WITHOUT ROWID and read by
                    # (originator_id, version) only: no position to keep.
                    result = conn.execute(
                        sa.text(f"DELETE FROM {table} WHERE originator_id = :m"), {"m": hex_id}
                    )
                    erased += int(result.rowcount)
                    continue
                top = conn.execute(sa.text(f"SELECT max(rowid) FROM {table}")).scalar()
                result = conn.execute(
                    sa.text(f"DELETE FROM {table} WHERE originator_id = :m"), {"m": hex_id}
                )
                erased += int(result.rowcount)
                after = conn.execute(sa.text(f"SELECT max(rowid) FROM {table}")).scalar()
                if top is not None and (after is None or after < top):
                    # The library's table has no AUTOINCREMENT: keep the highest rowid
                    # taken, so it is never handed out again and a reader that has seen
                    # it cannot skip a new event.
                    conn.execute(
                        sa.text(
                            f"INSERT INTO {table} (rowid, originator_id, originator_version, "
                            "topic, state) VALUES (:r, :nil, :r, :topic, x'')"
                        ),
                        {"r": top, "nil": NIL_HEX, "topic": TOMBSTONE_TOPIC},
                    )
                    conn.execute(
                        sa.text(f"DELETE FROM {table} WHERE originator_id = :nil AND rowid < :r"),
                        {"nil": NIL_HEX, "r": top},
                    )
        return erased

    def erase_read_models(self, user_id: str) -> dict[str, int]:
        member_id = str(Member.create_id(user_id))
        with self._db.write() as conn:
            quarantined = conn.execute(
                sa.text("DELETE FROM projection_quarantine WHERE member_id = :m"), {"m": member_id}
            ).rowcount
            # Invalidate every projection batch read before now (see the projection).
            conn.execute(sa.text("UPDATE projection_tracking SET epoch = epoch + 1"))
            self._forget_in_rollups(conn, user_id)
            history = conn.execute(
                sa.text("DELETE FROM member_history WHERE user_id = :u"), {"u": user_id}
            ).rowcount
            lots = conn.execute(
                sa.text("DELETE FROM member_lots WHERE user_id = :u"), {"u": user_id}
            ).rowcount
            ranks = conn.execute(
                sa.text("DELETE FROM member_ranks WHERE user_id = :u"), {"u": user_id}
            ).rowcount
            balances = conn.execute(
                sa.text("DELETE FROM member_balances WHERE user_id = :u"), {"u": user_id}
            ).rowcount
            # after the stream (step event_store): no insert can add one any more
            explanations = conn.execute(
                sa.text("DELETE FROM award_explanations WHERE user_id = :u"), {"u": user_id}
            ).rowcount
        return {
            "award_explanations": int(explanations),
            "member_history": int(history),
            "member_balances": int(balances),
            "member_lots": int(lots),
            "member_ranks": int(ranks),
            "projection_quarantine": int(quarantined),
        }

    def _forget_in_rollups(self, conn: sa.Connection, user_id: str) -> None:
        """Take the member's projected balance, account and rank out of today's account
        figures (counts only: the rollups never hold a member), in the transaction that
        deletes the rows they were counted from."""
        balance = conn.execute(
            sa.text("SELECT currency FROM member_balances WHERE user_id = :u"), {"u": user_id}
        ).scalar()
        if balance is None:
            return
        rank = conn.execute(
            sa.text(
                "SELECT ref FROM member_history WHERE user_id = :u AND kind = 'rank_changed' "
                "ORDER BY position DESC LIMIT 1"
            ),
            {"u": user_id},
        ).scalar()
        RollupStore(self._db).add_days(
            conn, {datetime.now(UTC).date(): forgotten_day(int(balance), rank)}
        )

    # -- events out (issue 17) ---------------------------------------------------------
    def erase_delivery(
        self, user_id: str, request_id: str, requested_at: datetime
    ) -> dict[str, int]:
        """Drop the member's webhook dead letters; owe each durable way out a
        member.forgotten notice (deleted once delivered)."""
        from loyalty.adapters.delivery_store import SqlDeliveryStore

        return SqlDeliveryStore(self._db).erase_member(user_id, request_id, requested_at)

    def vacuum(self) -> None:
        """Make deleted rows physically go away. PostgreSQL: VACUUM (the library turns
        autovacuum down on its events table). SQLite: secure_delete zeroed the cells;
        checkpoint the WAL so no old page copy remains there either."""
        if self._pg:
            with self._db.engine.connect() as conn:
                conn = conn.execution_options(isolation_level="AUTOCOMMIT")
                tables = self._existing(
                    conn,
                    LOCATIONS["event_store"]
                    + LOCATIONS["read_models"]
                    + LOCATIONS["pipeline_caps"]
                    + LOCATIONS["pipeline_pending"]
                    + LOCATIONS["forget_subjects"]
                    + LOCATIONS["delivery"]
                    + LOCATIONS["award_explanations"],
                )
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
    from datetime import UTC

    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
