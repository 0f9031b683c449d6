"""Retention SQL for both backends (the use case is ``loyalty.application.retention``).

PostgreSQL: an expired day partition that holds no unprocessed row is detached with
``DETACH PARTITION ... CONCURRENTLY`` (SHARE UPDATE EXCLUSIVE on ``ingress_events``, so
COPY and readers go on; ACCESS EXCLUSIVE only on the expired partition), checked again
(a row that raced in puts it back with ATTACH), then dropped. A detach interrupted
half-way is finished with ``DETACH PARTITION ... FINALIZE``; a table left detached by a
crash is checked and dropped (or re-attached) on the next run. Partitions for today and
tomorrow are created ahead by CREATE TABLE + ATTACH PARTITION, which (unlike
``CREATE TABLE ... PARTITION OF``) never takes an ACCESS EXCLUSIVE lock on the parent.

SQLite: expired rows the pipeline has processed are deleted in chunks of
:data:`CHUNK_ROWS` (short write transactions, so ingest interleaves); the freed pages go
back with ``PRAGMA incremental_vacuum`` and ``PRAGMA wal_checkpoint(TRUNCATE)``.

A row is processed iff its (txid, seq) is at or below its shard's checkpoint; a shard
without a checkpoint has processed nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import orjson
import sqlalchemy as sa
from psycopg import sql

from loyalty.adapters.db import Database, psycopg_connection
from loyalty.adapters.ingress_log import (
    KEYS_DAYS,
    attach_partition_sql,
    create_day_partition,
    day_start,
    partition_name,
    sqlite_timestamp,
)
from loyalty.adapters.lease_keys import RETENTION_LEASE
from loyalty.adapters.pipeline_store import SHARD_LEASE_NS, PipelineStore, ShardLeases
from loyalty.adapters.rollup_store import RollupStore
from loyalty.adapters.tables import (
    CAPS_PARTITION_PREFIX,
    INGRESS_PARTITION_PREFIX,
    KEYS_PARTITION_PREFIX,
)
from loyalty.application.retention import DayOutcome

CHUNK_ROWS = 5_000
_PARTITION_RE = re.compile(rf"^{INGRESS_PARTITION_PREFIX}(\d{{8}})$")
_KEYS_RE = re.compile(rf"^{KEYS_PARTITION_PREFIX}(\d{{8}})$")
_CAPS_RE = re.compile(rf"^{CAPS_PARTITION_PREFIX}(\d{{8}})$")

# Only the columns retention needs (a private MetaData: the forget-me adapter owns the
# table's full definition, and the table may not exist).
_markers = sa.Table(
    "forget_markers",
    sa.MetaData(),
    sa.Column("expires_at", sa.DateTime(timezone=True)),
)

PartitionState = Literal["attached", "detach_pending", "detached"]


@contextmanager
def _lease(db: Database) -> Iterator[bool]:
    """The retention lease, in ShardLeases' namespace (so ``ShardLeases.try_acquire(
    RETENTION_LEASE)`` excludes it too), released at the end of the block. On PostgreSQL
    the session lock is unlocked explicitly: closing a pooled connection only returns it
    to the pool, session and lock still alive."""
    if db.backend != "postgresql":
        leases = ShardLeases(db)
        try:
            yield leases.try_acquire(RETENTION_LEASE)
        finally:
            leases.release_all()
        return
    key = {"ns": SHARD_LEASE_NS, "key": RETENTION_LEASE}
    with db.engine.connect() as conn:
        got = bool(conn.execute(sa.text("SELECT pg_try_advisory_lock(:ns, :key)"), key).scalar())
        conn.commit()
        try:
            yield got
        finally:
            if got:
                conn.execute(sa.text("SELECT pg_advisory_unlock(:ns, :key)"), key)
                conn.commit()


def _delete_expired_markers(db: Database, as_of: datetime) -> int:
    """One DELETE, when the table exists (its ``expires_at`` is there since migration
    0004: reflecting its columns first cost more than the DELETE)."""
    with db.write() as conn:
        if not sa.inspect(conn).has_table("forget_markers"):
            return 0
        moment = as_of.astimezone(UTC)
        return conn.execute(sa.delete(_markers).where(_markers.c.expires_at < moment)).rowcount


class PostgresRetentionStore:
    backend = "postgresql"

    def __init__(self, db: Database) -> None:
        self._db = db
        self._shard_count = db.settings.shard_count

    def lease(self) -> AbstractContextManager[bool]:
        return _lease(self._db)

    # -- partitions --------------------------------------------------------------------
    def _tables(
        self, parent: str, prefix: str, pattern: re.Pattern[str]
    ) -> list[tuple[str, date, PartitionState, int]]:
        """Every table named like a partition of ``parent`` (``prefix``, then the day that
        ``pattern`` captures): name, day, attached or half-detached or detached, bytes."""
        with self._db.read() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT c.relname, i.inhrelid IS NOT NULL, "
                    "coalesce(i.inhdetachpending, false), pg_total_relation_size(c.oid) "
                    "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "LEFT JOIN pg_inherits i ON i.inhrelid = c.oid "
                    "AND i.inhparent = CAST(:parent AS regclass) "
                    "WHERE n.nspname = current_schema() AND c.relkind = 'r' "
                    "AND c.relname LIKE :prefix"
                ),
                {"parent": parent, "prefix": prefix + "%"},
            ).all()
        found: list[tuple[str, date, PartitionState, int]] = []
        for name, attached, pending, size in rows:
            match = pattern.match(name)
            if match is None:
                continue
            day = datetime.strptime(match.group(1), "%Y%m%d").date()
            state: PartitionState = (
                "detach_pending" if pending else "attached" if attached else "detached"
            )
            found.append((name, day, state, int(size)))
        return found

    def _states(self) -> dict[date, PartitionState]:
        """Every table named like a day partition: attached, half-detached or detached."""
        return {
            day: state
            for _, day, state, _ in self._tables(
                "ingress_events", INGRESS_PARTITION_PREFIX, _PARTITION_RE
            )
        }

    def ensure_days(self, days: set[date]) -> None:
        states = self._states()
        for day in sorted(days):
            if states.get(day) == "attached":
                continue
            create_day_partition(self._db, day)

    @staticmethod
    def _attach_sql(day: date) -> sql.Composed:
        return attach_partition_sql(day)

    def expired_days(self, cutoff: date) -> list[date]:
        """Expired days, a half-detached one first: PostgreSQL allows one partition pending
        detach per table, so no other DETACH ... CONCURRENTLY can start before it is
        finalised (an earlier day first failed the whole run, every run)."""
        states = self._states()
        return sorted(
            (day for day in states if day < cutoff),
            key=lambda day: (states[day] != "detach_pending", day),
        )

    def _autocommit(self, statement: sql.Composed) -> None:
        """A statement that must not run in a transaction block (DETACH CONCURRENTLY)."""
        with self._db.engine.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            psycopg_connection(conn).execute(statement)

    def _unprocessed(self, name: str) -> int:
        """Rows of the partition past their shard's checkpoint (or in no shard we run).

        The common answer is 0, proved by one index probe per shard on
        ``(shard, txid, seq)`` (a few ms, not a scan of the day); the exact count is only
        taken when some row is pending, for the report."""
        positions = PipelineStore(self._db).positions()
        past = sql.SQL(
            "SELECT 1 FROM {table} p WHERE p.shard = v.shard AND (p.txid, p.seq) > (v.txid, v.seq)"
        ).format(table=sql.Identifier(name))
        values = sql.SQL(", ").join(
            sql.SQL("({}, {}::bigint, {}::bigint)").format(
                sql.Literal(shard), sql.Literal(txid), sql.Literal(seq)
            )
            for shard, (txid, seq) in (
                (s, positions.get(s, (0, 0))) for s in range(self._shard_count)
            )
        )
        stray = sql.SQL("SELECT 1 FROM {} WHERE shard < 0 OR shard >= {}").format(
            sql.Identifier(name), sql.Literal(self._shard_count)
        )
        probe = sql.SQL(
            "SELECT EXISTS (SELECT 1 FROM (VALUES {values}) v(shard, txid, seq) "
            "WHERE EXISTS ({past})) OR EXISTS ({stray})"
        ).format(values=values, past=past, stray=stray)
        count = sql.SQL(
            "SELECT (SELECT count(*) FROM (VALUES {values}) v(shard, txid, seq) "
            "JOIN {table} p ON p.shard = v.shard AND (p.txid, p.seq) > (v.txid, v.seq)) "
            "+ (SELECT count(*) FROM ({stray}) s)"
        ).format(values=values, table=sql.Identifier(name), stray=stray)
        with self._db.read() as conn:
            raw = psycopg_connection(conn)
            found = raw.execute(probe).fetchone()
            if not (found and found[0]):
                return 0
            row = raw.execute(count).fetchone()
        return int(row[0]) if row else 0

    def unrolled_rows(self, day: date) -> int:
        origins = RollupStore(self._db).origins()
        name = partition_name(day)
        if not origins or self._states().get(day) is None:
            return 0
        values = sql.SQL(", ").join(
            sql.SQL("({}, {}::bigint, {}::bigint)").format(
                sql.Literal(shard), sql.Literal(txid), sql.Literal(seq)
            )
            for shard, (txid, seq) in sorted(origins.items())
        )
        count = sql.SQL(
            "SELECT count(*) FROM (VALUES {values}) v(shard, txid, seq) "
            "JOIN {table} p ON p.shard = v.shard AND (p.txid, p.seq) <= (v.txid, v.seq)"
        ).format(values=values, table=sql.Identifier(name))
        with self._db.read() as conn:
            row = psycopg_connection(conn).execute(count).fetchone()
        return int(row[0]) if row else 0

    def expire_day(self, day: date) -> DayOutcome:
        name = partition_name(day)
        ident = sql.Identifier(name)
        state = self._states().get(day)
        if state is None:  # gone meanwhile
            return DayOutcome(removed_rows=0, bytes=0, unprocessed_rows=0, removed=False)
        if state == "attached":
            pending = self._unprocessed(name)
            if pending:
                return DayOutcome(removed_rows=0, bytes=0, unprocessed_rows=pending, removed=False)
            self._autocommit(
                sql.SQL("ALTER TABLE ingress_events DETACH PARTITION {} CONCURRENTLY").format(ident)
            )
        elif state == "detach_pending":  # a previous run stopped half-way
            self._autocommit(
                sql.SQL("ALTER TABLE ingress_events DETACH PARTITION {} FINALIZE").format(ident)
            )
        # Detached: nothing can insert into it any more; the checkpoints only move on.
        pending = self._unprocessed(name)
        if pending:  # a row raced in before the detach: put the partition back
            with self._db.write() as conn:
                psycopg_connection(conn).execute(self._attach_sql(day))
            return DayOutcome(removed_rows=0, bytes=0, unprocessed_rows=pending, removed=False)
        with self._db.write() as conn:
            raw = psycopg_connection(conn)
            row = raw.execute(
                sql.SQL("SELECT count(*), pg_total_relation_size({}) FROM {}").format(
                    sql.Literal(name), ident
                )
            ).fetchone()
            assert row is not None
            raw.execute(sql.SQL("DROP TABLE {}").format(ident))
        return DayOutcome(
            removed_rows=int(row[0]), bytes=int(row[1]), unprocessed_rows=0, removed=True
        )

    def expire_keys(self, cutoff: date) -> int:
        """Drop the de-duplication keys' generations whose every receipt day, and the day
        after it (an event may be stamped up to the future skew ahead), is before
        ``cutoff``: DETACH CONCURRENTLY (ingest goes on), then DROP. Returns the bytes."""
        _, freed = self._drop_partitions(
            "ingress_keys",
            KEYS_PARTITION_PREFIX,
            _KEYS_RE,
            lambda generation: generation + timedelta(days=KEYS_DAYS) < cutoff,
        )
        return freed

    def _drop_partitions(
        self,
        parent: str,
        prefix: str,
        pattern: re.Pattern[str],
        expired: Callable[[date], bool],
        *,
        count: bool = False,
    ) -> tuple[int, int]:
        """Drop every partition (attached, half-detached or detached) of ``parent`` whose
        day is ``expired``: DETACH CONCURRENTLY (writers and readers of the parent go on;
        FINALIZE for one a crash left half-detached), then DROP. Returns the rows (when
        ``count``: read before the drop) and the bytes."""
        rows = freed = 0
        for name, day, state, size in self._tables(parent, prefix, pattern):
            if not expired(day):
                continue
            ident = sql.Identifier(name)
            if state != "detached":
                how = "FINALIZE" if state == "detach_pending" else "CONCURRENTLY"
                self._autocommit(
                    sql.SQL("ALTER TABLE {} DETACH PARTITION {} {}").format(
                        sql.Identifier(parent), ident, sql.SQL(how)
                    )
                )
            with self._db.write() as conn:
                raw = psycopg_connection(conn)
                if count:
                    found = raw.execute(sql.SQL("SELECT count(*) FROM {}").format(ident)).fetchone()
                    rows += int(found[0]) if found else 0
                raw.execute(sql.SQL("DROP TABLE {}").format(ident))
            freed += size
        return rows, freed

    # -- derived rows --------------------------------------------------------------------
    def delete_caps_before(self, day: date) -> tuple[int, int]:
        """Cap counters of days before ``day`` whose ingress is gone, dropped with their
        day's partition (migration 0023): a day that still has an ingress partition (kept
        for its unprocessed events, or half-dropped) keeps its counters, which the
        pipeline needs when it weighs those events."""
        ingress = self._states()
        return self._drop_partitions(
            "pipeline_caps",
            CAPS_PARTITION_PREFIX,
            _CAPS_RE,
            lambda d: d < day and d not in ingress,
            count=True,
        )

    def delete_expired_markers(self, as_of: datetime) -> int:
        return _delete_expired_markers(self._db, as_of)

    def finish(self) -> int:
        """Nothing left to give back: the day partitions, the caps' partitions and the
        keys' generations went back with DROP TABLE."""
        return 0


class SqliteRetentionStore:
    backend = "sqlite"

    def __init__(self, db: Database, *, chunk_rows: int = CHUNK_ROWS) -> None:
        self._db = db
        self._path: Path = db.settings.sqlite_path
        self._chunk = chunk_rows

    def lease(self) -> AbstractContextManager[bool]:
        return _lease(self._db)

    def ensure_days(self, days: set[date]) -> None:
        return None  # one table: nothing to create

    def expired_days(self, cutoff: date) -> list[date]:
        with self._db.read() as conn:
            rows = conn.exec_driver_sql(
                "SELECT DISTINCT substr(occurred_at, 1, 10) FROM ingress_events "
                "WHERE occurred_at < ? ORDER BY 1",
                (sqlite_timestamp(day_start(cutoff)),),
            ).scalars()
            return [date.fromisoformat(r) for r in rows]

    def file_bytes(self) -> int:
        total = 0
        for path in (self._path, self._path.with_name(self._path.name + "-wal")):
            if path.exists():
                total += path.stat().st_size
        return total

    def _processed_clause(self) -> tuple[str, list[Any]]:
        positions = PipelineStore(self._db).positions()
        if not positions:
            return "0", []
        clauses, params = [], []
        for shard, (txid, seq) in sorted(positions.items()):
            clauses.append("(shard = ? AND (txid, seq) <= (?, ?))")
            params += [shard, txid, seq]
        return "(" + " OR ".join(clauses) + ")", params

    def unrolled_rows(self, day: date) -> int:
        origins = RollupStore(self._db).origins()
        if not origins:
            return 0
        bounds = [sqlite_timestamp(day_start(day)), sqlite_timestamp(day_start(day + timedelta(1)))]
        clauses, params = [], []
        for shard, (txid, seq) in sorted(origins.items()):
            clauses.append("(shard = ? AND (txid, seq) <= (?, ?))")
            params += [shard, txid, seq]
        with self._db.read() as conn:
            return int(
                conn.exec_driver_sql(
                    "SELECT count(*) FROM ingress_events WHERE occurred_at >= ? "
                    f"AND occurred_at < ? AND ({' OR '.join(clauses)})",
                    (*bounds, *params),
                ).scalar_one()
            )

    def expire_day(self, day: date) -> DayOutcome:
        self.reclaim(vacuum=False)  # a WAL written by others is not this day's bytes
        before = self.file_bytes()
        bounds = [sqlite_timestamp(day_start(day)), sqlite_timestamp(day_start(day + timedelta(1)))]
        processed, params = self._processed_clause()
        delete = (
            "DELETE FROM ingress_events WHERE seq IN (SELECT seq FROM ingress_events "
            f"WHERE occurred_at >= ? AND occurred_at < ? AND {processed} LIMIT ?)"
        )
        removed = 0
        while True:
            with self._db.write() as conn:
                n = conn.exec_driver_sql(delete, (*bounds, *params, self._chunk)).rowcount
            removed += n
            if n < self._chunk:
                break
        with self._db.read() as conn:
            left = int(
                conn.exec_driver_sql(
                    "SELECT count(*) FROM ingress_events "
                    "WHERE occurred_at >= ? AND occurred_at < ?",
                    tuple(bounds),
                ).scalar_one()
            )
        self.reclaim()
        return DayOutcome(
            removed_rows=removed,
            bytes=max(0, before - self.file_bytes()),
            unprocessed_rows=left,
            removed=left == 0,
        )

    def reclaim(self, *, vacuum: bool = True) -> None:
        """Give free pages back to the file system (``vacuum``) and empty the WAL."""
        with self._db.engine.connect() as conn:
            raw = conn.connection.dbapi_connection
            assert raw is not None
            if vacuum:
                # Each step of this pragma frees one page; pysqlite's execute() steps a
                # statement that returns no rows only once, executescript() to the end.
                raw.executescript("PRAGMA incremental_vacuum;")
            cursor = raw.cursor()
            try:
                cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            finally:
                cursor.close()

    def delete_caps_before(self, day: date) -> tuple[int, int]:
        """Cap counters of days before ``day`` that hold no ingress row any more: a day
        kept for its unprocessed events keeps its counters (the pipeline needs them).
        Their pages go back with :meth:`finish` (bytes 0 here)."""
        kept = orjson.dumps([d.isoformat() for d in self.expired_days(day)]).decode()
        deleted = 0
        while True:
            with self._db.write() as conn:
                n = conn.exec_driver_sql(
                    "DELETE FROM pipeline_caps WHERE rowid IN "
                    "(SELECT rowid FROM pipeline_caps WHERE day < ? "
                    "AND day NOT IN (SELECT value FROM json_each(?)) LIMIT ?)",
                    (day.isoformat(), kept, self._chunk),
                ).rowcount
            deleted += n
            if n < self._chunk:
                return deleted, 0

    def delete_expired_markers(self, as_of: datetime) -> int:
        return _delete_expired_markers(self._db, as_of)

    def expire_keys(self, cutoff: date) -> int:
        return 0  # the one table's UNIQUE (source, event_id): its rows go with them

    def finish(self) -> int:
        before = self.file_bytes()
        self.reclaim()
        return max(0, before - self.file_bytes())


def create_retention_store(db: Database) -> PostgresRetentionStore | SqliteRetentionStore:
    return PostgresRetentionStore(db) if db.backend == "postgresql" else SqliteRetentionStore(db)
