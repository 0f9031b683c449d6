"""The ingress log on both backends.

PostgreSQL: one day partition per UTC day of ``occurred_at`` (created on demand); rows
go in with COPY. De-duplication is per (source, event_id) across every day still kept:
a statement-level trigger records each stored row's key in ``ingress_keys`` (primary
key (source, event_id); migration 0006), so a resend stamped on another day (a client
that stamps the time when it sends, retrying after midnight) is a duplicate too. The
common case (no resent event) is one COPY statement straight into the partitioned table,
sent on an autocommit connection so that the statement (rows and keys) is the whole
transaction (one round trip, no BEGIN/COMMIT); only a batch that collides (nothing of it
stored) falls back to COPY into a staging table, recording the new keys with ``INSERT
... ON CONFLICT DO NOTHING`` and inserting only their rows, in one transaction. A day's
keys are deleted with its partition (retention), so a resend older than the retention
window is accepted again (it is also too old to be accepted, unless re-stamped). COPY
uses the binary format, rows formatted by psycopg's C dumpers (see :func:`_copy`).

Read order is (txid, seq) and only rows of transactions older than every transaction
still in flight are returned (``pg_snapshot_xmin``), so a reader that remembers its last
position never skips a row that commits late. SQLite has one writer at a time, so its
AUTOINCREMENT ``seq`` is already commit order (``txid`` is 0).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from functools import partial
from typing import Any, NamedTuple

import orjson
import psycopg
import sqlalchemy as sa
from psycopg import sql
from psycopg.types.json import set_json_loads

from loyalty.adapters.db import Database, psycopg_connection
from loyalty.adapters.tables import (
    CAPS_PARTITION_PREFIX,
    INGRESS_PARTITION_PREFIX,
    KEYS_PARTITION_PREFIX,
)
from loyalty.application.ingress import IngressRecord, Stored, same_content

Position = tuple[int, int]
START: Position = (0, 0)
_FAR: Position = (2**62, 2**62)
# Advisory lock namespace that serializes creation of one day partition.
PARTITION_LOCK_NS = 7_304_118

_COPY_COLUMNS = "(shard, source, event_id, user_id, type, occurred_at, attributes)"
_STAGED = "s.shard, s.source, s.event_id, s.user_id, s.type, s.occurred_at, s.attributes"


class StoredIngress(NamedTuple):
    """One row of the ingress log as the pipeline reads it (a tuple: cheap to build)."""

    txid: int
    seq: int
    shard: int
    source: str
    event_id: str
    user_id: str
    event_type: str
    occurred_at: datetime
    attributes: dict[str, Any]

    @property
    def position(self) -> Position:
        return (self.txid, self.seq)


# Builds a StoredIngress from a fetched row tuple in C (no Python frame per row): the
# pipeline reads ~100k rows/s and a per-row ``StoredIngress(*row)`` was a tenth of it.
_stored_from_row = partial(tuple.__new__, StoredIngress)


def partition_name(day: date) -> str:
    return f"{INGRESS_PARTITION_PREFIX}{day:%Y%m%d}"


def caps_partition_name(day: date) -> str:
    return f"{CAPS_PARTITION_PREFIX}{day:%Y%m%d}"


def day_start(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def sqlite_timestamp(moment: datetime) -> str:
    """Fixed-width UTC text, so that text order is time order."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f+00:00")


# Binary COPY: psycopg's C dumpers format each field (about half the client CPU of the
# text format, and less parsing for the server). ``attributes`` goes as jsonb's binary
# form, which is a version byte (1) and the JSON text: sent as bytea bytes, the text is
# parsed by the server exactly as in the text format.
_BINARY_TYPES = ["int2", "text", "text", "text", "text", "timestamptz", "bytea"]
_JSONB_V1 = b"\x01"


def _copy(raw: psycopg.Connection[Any], table: str, records: Sequence[IngressRecord]) -> None:
    if any(r.occurred_at.tzinfo is None for r in records):
        # A naive time means "in the session's time zone": only the text format says so.
        with raw.cursor() as cur, cur.copy(f"COPY {table} {_COPY_COLUMNS} FROM STDIN") as cp:
            for r in records:
                cp.write_row(
                    (
                        r.shard,
                        r.source,
                        r.event_id,
                        r.user_id,
                        r.type,
                        r.occurred_at,
                        r.attributes_json,
                    )
                )
        return
    statement = f"COPY {table} {_COPY_COLUMNS} FROM STDIN (FORMAT BINARY)"
    with raw.cursor() as cur, cur.copy(statement) as copy:
        copy.set_types(_BINARY_TYPES)
        write, v1 = copy.write_row, _JSONB_V1
        for r in records:
            write(
                (
                    r.shard,
                    r.source,
                    r.event_id,
                    r.user_id,
                    r.type,
                    r.occurred_at,
                    v1 + r.attributes_json.encode(),
                )
            )


def _create_attached(db: Database, lock_key: int, name: str, *ddl: sql.Composed) -> bool:
    """Run ``ddl`` (CREATE TABLE ``name``, ..., ATTACH PARTITION) unless ``name`` exists;
    True if run. CREATE TABLE and ATTACH PARTITION (SHARE UPDATE EXCLUSIVE on the parent)
    rather than CREATE TABLE ... PARTITION OF, which takes an ACCESS EXCLUSIVE lock and
    would stall every ingest queued behind it. Serialized per table by an advisory lock."""
    with db.write() as conn:
        conn.execute(
            sa.text("SELECT pg_advisory_xact_lock(:ns, :key)"),
            {"ns": PARTITION_LOCK_NS, "key": lock_key},
        )
        if conn.execute(sa.text("SELECT to_regclass(:n)"), {"n": name}).scalar() is not None:
            return False  # exists (or a detached leftover: retention deals with it)
        raw = psycopg_connection(conn)
        for statement in ddl:
            raw.execute(statement)
    return True


def create_day_partition(db: Database, day: date, *, caps: bool = True) -> bool:
    """Create ``day``'s partition, and its cap counters' partition (not with ``caps``
    False: a schema from before migration 0023), unless they exist; True if the ingress
    partition was created."""
    name = partition_name(day)
    create = sql.SQL("CREATE TABLE {} (LIKE ingress_events INCLUDING DEFAULTS)")
    # No UNIQUE (source, event_id) of its own: ingress_keys de-duplicates across days.
    created = _create_attached(
        db, day.toordinal(), name, create.format(sql.Identifier(name)), attach_partition_sql(day)
    )
    if caps:
        create_caps_partition(db, day)
    return created


def create_caps_partition(db: Database, day: date) -> bool:
    """Create the partition of ``day``'s daily cap counters unless it exists (migration
    0023: a counter is of the day its event occurred, so of that event's partition);
    True if created. Its primary key is made by ATTACH, from the parent's."""
    name = caps_partition_name(day)
    ident = sql.Identifier(name)
    return _create_attached(
        db,
        day.toordinal(),  # the day's lock: the same as its ingress partition's
        name,
        sql.SQL("CREATE TABLE {} (LIKE pipeline_caps)").format(ident),
        sql.SQL(
            "ALTER TABLE pipeline_caps ATTACH PARTITION {} FOR VALUES FROM ({}) TO ({})"
        ).format(ident, sql.Literal(day), sql.Literal(day + timedelta(days=1))),
    )


KEYS_EPOCH = date(2000, 1, 3)
KEYS_DAYS = 8
KEYS_LOCK_NS = 7_304_119
"""The de-duplication keys' partitions: generations of eight receipt days from the epoch,
and the advisory lock namespace of a generation's batches (migration 0022, whose SQL
functions use the same values)."""


def key_generation(day: date) -> date:
    """The first day of ``day``'s generation of keys (``ingress_keys_generation``)."""
    return day - timedelta(days=(day - KEYS_EPOCH).days % KEYS_DAYS)


def keys_partition_name(generation: date) -> str:
    return f"{KEYS_PARTITION_PREFIX}{generation:%Y%m%d}"


def create_keys_partition(db: Database, generation: date) -> bool:
    """Create the keys' partition of the generation starting on ``generation``, with its
    UNIQUE index, unless it exists; True if created."""
    name = keys_partition_name(generation)
    ident = sql.Identifier(name)
    end = generation + timedelta(days=KEYS_DAYS)
    return _create_attached(
        db,
        -generation.toordinal(),  # the day partitions' keys are positive
        name,
        sql.SQL("CREATE TABLE {} (LIKE ingress_keys)").format(ident),
        sql.SQL("CREATE UNIQUE INDEX {} ON {} (source, event_id)").format(
            sql.Identifier(f"{name}_key"), ident
        ),
        sql.SQL("ALTER TABLE ingress_keys ATTACH PARTITION {} FOR VALUES FROM ({}) TO ({})").format(
            ident, sql.Literal(generation), sql.Literal(end)
        ),
    )


def attach_partition_sql(day: date) -> sql.Composed:
    lower, upper = day_start(day), day_start(day + timedelta(days=1))
    return sql.SQL(
        "ALTER TABLE ingress_events ATTACH PARTITION {} FOR VALUES FROM ({}) TO ({})"
    ).format(sql.Identifier(partition_name(day)), sql.Literal(lower), sql.Literal(upper))


def _sqlite_row(r: Any) -> StoredIngress:
    """An ``ingress_events`` row as SQLite returns it (text timestamp and attributes)."""
    return StoredIngress(
        r[0], r[1], r[2], r[3], r[4], r[5], r[6], datetime.fromisoformat(r[7]), orjson.loads(r[8])
    )


class PostgresIngressLog:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._known_days: set[date] = set()
        self._known_generations: set[date] = set()
        self._lock = threading.Lock()

    # -- partitions -------------------------------------------------------------------
    def ensure_partitions(self, days: set[date]) -> None:
        missing = days - self._known_days
        for day in sorted(missing):
            self._create_partition(day)
        # The keys' generations around today (the database's clock decides which one a
        # key goes to: a day either side of this process's).
        today = datetime.now(UTC).date()
        generations = {key_generation(today + timedelta(days=d)) for d in (-1, 0, 1)}
        for generation in sorted(generations - self._known_generations):
            create_keys_partition(self._db, generation)
        with self._lock:
            self._known_days |= missing
            self._known_generations |= generations

    def _create_partition(self, day: date) -> None:
        create_day_partition(self._db, day)

    def partitions(self) -> list[date]:
        with self._db.read() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                    "WHERE i.inhparent = 'ingress_events'::regclass ORDER BY 1"
                )
            ).scalars()
            return [
                datetime.strptime(r[len(INGRESS_PARTITION_PREFIX) :], "%Y%m%d").date() for r in rows
            ]

    def forget_partition_cache(self) -> None:
        with self._lock:
            self._known_days.clear()
            self._known_generations.clear()

    # -- append ----------------------------------------------------------------------
    def append(self, records: Sequence[IngressRecord]) -> int:
        return self.store(records).inserted

    def store(self, records: Sequence[IngressRecord]) -> Stored:
        self.ensure_partitions({r.occurred_at.date() for r in records})
        try:
            return self._append(records)
        except psycopg.errors.CheckViolation:
            # "no partition of relation found for row": a partition this process
            # believed in was dropped (retention); re-check and try once more.
            self.forget_partition_cache()
            self.ensure_partitions({r.occurred_at.date() for r in records})
            return self._append(records)

    def _append(self, records: Sequence[IngressRecord]) -> Stored:
        with self._db.engine.connect() as conn:
            # One statement is one transaction: all rows or (on a duplicate) none.
            conn.execution_options(isolation_level="AUTOCOMMIT")
            raw = psycopg_connection(conn)
            try:
                _copy(raw, "ingress_events", records)
                return Stored(len(records))
            except (
                psycopg.errors.UniqueViolation,
                psycopg.errors.DeadlockDetected,
                psycopg.errors.SerializationFailure,
            ):
                # a key stored before (or by a batch committing meanwhile, whose keys
                # this one waited for in another order), or a new generation of keys
                # began while it was stored: nothing of this batch is stored
                pass
        with self._db.write() as conn:
            raw = psycopg_connection(conn)
            raw.execute(
                "CREATE TEMP TABLE IF NOT EXISTS ingress_staging "
                "(LIKE ingress_events INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
            )
            _copy(raw, "ingress_staging", records)
            # The keys are recorded here (only the new ones: not in the current
            # generation, nor in an older one; in key order so that two fallbacks lock
            # them in the same order); the trigger stands aside.
            raw.execute("SET LOCAL loyalty.keys_recorded = 'on'")
            row = raw.execute("SELECT ingress_keys_enter()").fetchone()
            assert row is not None
            received = row[0]
            cur = raw.execute(
                "WITH new_keys AS ("
                "INSERT INTO ingress_keys (source, event_id, day, fingerprint) "
                "SELECT s.source, s.event_id, %(day)s, "
                "ingress_fingerprint(s.user_id, s.type, s.occurred_at, s.attributes) "
                "FROM ingress_staging s WHERE NOT EXISTS (SELECT 1 FROM ingress_keys o "
                "WHERE o.source = s.source AND o.event_id = s.event_id "
                "AND o.day < %(generation)s) "
                "ORDER BY s.source, s.event_id "
                "ON CONFLICT DO NOTHING RETURNING source, event_id) "
                f"INSERT INTO ingress_events {_COPY_COLUMNS} "
                f"SELECT {_STAGED} FROM ingress_staging s "
                "JOIN new_keys k ON k.source = s.source AND k.event_id = s.event_id "
                "ORDER BY s.seq RETURNING source, event_id",
                {"day": received, "generation": key_generation(received)},
            )
            new = set(cur.fetchall())
            old = [i for i, r in enumerate(records) if (r.source, r.event_id) not in new]
            # A new statement (a new snapshot): it sees keys of batches committed while
            # this one waited. A key without a fingerprint (stored before migration
            # 0018) is not known to conflict.
            cur = raw.execute(
                "SELECT s.source, s.event_id FROM ingress_staging s JOIN ingress_keys k "
                "ON k.source = s.source AND k.event_id = s.event_id "
                "WHERE k.fingerprint <> "
                "ingress_fingerprint(s.user_id, s.type, s.occurred_at, s.attributes)"
            )
            conflicting = set(cur.fetchall())
            return Stored(
                len(new),
                {i: (records[i].source, records[i].event_id) in conflicting for i in old},
            )

    # -- read ------------------------------------------------------------------------
    def read_after(
        self, shard: int, after: Position, limit: int, upto: Position | None = None
    ) -> list[StoredIngress]:
        """Rows of ``shard`` past ``after`` (and up to ``upto``) in a stable, gap-safe
        order."""
        upto = upto or _FAR
        with self._db.read() as conn:
            raw = psycopg_connection(conn)
            with raw.cursor() as cur:
                # orjson is several times faster than json for the jsonb column
                set_json_loads(orjson.loads, cur)
                cur.execute(
                    "SELECT txid, seq, shard, source, event_id, user_id, type, occurred_at, "
                    "attributes FROM ingress_events "
                    "WHERE shard = %s AND (txid, seq) > (%s, %s) AND (txid, seq) <= (%s, %s) "
                    "AND txid < pg_snapshot_xmin(pg_current_snapshot())::text::bigint "
                    "ORDER BY txid, seq LIMIT %s",
                    (shard, after[0], after[1], upto[0], upto[1], limit),
                )
                return list(map(_stored_from_row, cur.fetchall()))

    def read_day(
        self,
        day: date,
        shard: int,
        after: Position,
        limit: int,
        received_before: datetime | None = None,
    ) -> list[StoredIngress]:
        """Rows of ``shard`` that occurred on ``day`` past ``after``, in (txid, seq)
        order (the rule dry run's read: one day partition, by the read index)."""
        received = "AND received_at < %s " if received_before is not None else ""
        params: list[Any] = [shard, day_start(day), day_start(day + timedelta(days=1))]
        params += [after[0], after[1]]
        if received_before is not None:
            params.append(received_before)
        params.append(limit)
        with self._db.read() as conn:
            raw = psycopg_connection(conn)
            with raw.cursor() as cur:
                set_json_loads(orjson.loads, cur)
                cur.execute(
                    "SELECT txid, seq, shard, source, event_id, user_id, type, occurred_at, "
                    "attributes FROM ingress_events WHERE shard = %s AND occurred_at >= %s "
                    "AND occurred_at < %s AND (txid, seq) > (%s, %s) "
                    f"{received}ORDER BY txid, seq LIMIT %s",
                    params,
                )
                return list(map(_stored_from_row, cur.fetchall()))


def _pending_sql(positions: dict[int, Position], placeholder: str) -> tuple[str, list[Any]]:
    """count and oldest received_at of rows past each shard's checkpoint."""
    clauses, params = [], []
    for shard, (txid, seq) in sorted(positions.items()):
        p = placeholder
        clauses.append(f"(shard = {p} AND (txid, seq) > ({p}, {p}))")
        params += [shard, txid, seq]
    where = " OR ".join(clauses) if clauses else "1 = 1"
    return f"SELECT count(*), min(received_at) FROM ingress_events WHERE {where}", params


def _as_record(row: StoredIngress) -> IngressRecord:
    return IngressRecord(
        row.shard,
        row.source,
        row.event_id,
        row.user_id,
        row.event_type,
        row.occurred_at,
        orjson.dumps(row.attributes).decode(),
    )


class SqliteIngressLog:
    def __init__(self, db: Database) -> None:
        self._db = db

    def append(self, records: Sequence[IngressRecord]) -> int:
        return self.store(records).inserted

    def store(self, records: Sequence[IngressRecord]) -> Stored:
        received = sqlite_timestamp(datetime.now(UTC))
        rows = [
            (
                r.shard,
                r.source,
                r.event_id,
                r.user_id,
                r.type,
                sqlite_timestamp(r.occurred_at),
                received,
                r.attributes_json,
            )
            for r in records
        ]
        with self._db.write() as conn:
            raw = conn.connection.driver_connection
            assert raw is not None
            before = raw.total_changes
            raw.executemany(
                "INSERT INTO ingress_events "
                "(shard, source, event_id, user_id, type, occurred_at, received_at, attributes) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (source, event_id) DO NOTHING",
                rows,
            )
            inserted: int = raw.total_changes - before
            if inserted == len(rows):
                return Stored(inserted)
            # Some keys were stored before: the stored row (kept as long as its key) is
            # the content to compare with. One writer at a time and AUTOINCREMENT: this
            # statement's rows are the last ``inserted`` sequence numbers.
            (last,) = raw.execute("SELECT last_insert_rowid()").fetchone()
            first_new = last - inserted + 1 if inserted else 2**62
            stored: dict[tuple[str, str], StoredIngress] = {}
            keys = [(r.source, r.event_id) for r in records]
            for start in range(0, len(keys), 400):
                chunk = keys[start : start + 400]
                where = " OR ".join(["(source = ? AND event_id = ?)"] * len(chunk))
                for row in raw.execute(
                    "SELECT txid, seq, shard, source, event_id, user_id, type, occurred_at, "
                    f"attributes FROM ingress_events WHERE {where}",
                    [v for key in chunk for v in key],
                ):
                    if row[1] < first_new:
                        stored[(row[3], row[4])] = _sqlite_row(row)
            not_stored = {}
            for i, (key, r) in enumerate(zip(keys, records, strict=True)):
                earlier = stored.get(key)
                if earlier is not None:
                    not_stored[i] = not same_content(r, _as_record(earlier))
            return Stored(inserted, not_stored)

    def read_after(
        self, shard: int, after: Position, limit: int, upto: Position | None = None
    ) -> list[StoredIngress]:
        upto = upto or _FAR
        with self._db.read() as conn:
            result = conn.exec_driver_sql(
                "SELECT txid, seq, shard, source, event_id, user_id, type, occurred_at, "
                "attributes FROM ingress_events WHERE shard = ? AND (txid, seq) > (?, ?) "
                "AND (txid, seq) <= (?, ?) ORDER BY txid, seq LIMIT ?",
                (shard, after[0], after[1], upto[0], upto[1], limit),
            )
            return [_sqlite_row(r) for r in result]

    def read_day(
        self,
        day: date,
        shard: int,
        after: Position,
        limit: int,
        received_before: datetime | None = None,
    ) -> list[StoredIngress]:
        """Rows of ``shard`` that occurred on ``day`` past ``after``, in (txid, seq)
        order (the rule dry run's read)."""
        received = "AND received_at < ? " if received_before is not None else ""
        params: list[Any] = [
            shard,
            sqlite_timestamp(day_start(day)),
            sqlite_timestamp(day_start(day + timedelta(days=1))),
            after[0],
            after[1],
        ]
        if received_before is not None:
            params.append(sqlite_timestamp(received_before))
        params.append(limit)
        with self._db.read() as conn:
            result = conn.exec_driver_sql(
                "SELECT txid, seq, shard, source, event_id, user_id, type, occurred_at, "
                "attributes FROM ingress_events WHERE shard = ? AND occurred_at >= ? "
                "AND occurred_at < ? AND (txid, seq) > (?, ?) "
                f"{received}ORDER BY txid, seq LIMIT ?",
                tuple(params),
            )
            return [_sqlite_row(r) for r in result]


def pending_stats(
    db: Database, positions: dict[int, Position], shard_count: int
) -> tuple[int, datetime | None]:
    """Ingress rows not yet processed (shards without a checkpoint count from the start)."""
    every = {shard: positions.get(shard, START) for shard in range(shard_count)}
    if db.backend == "postgresql":
        text, params = _pending_sql(every, "%s")
        with db.read() as conn:
            count, oldest = conn.exec_driver_sql(text, tuple(params)).one()
        return int(count), oldest
    text, params = _pending_sql(every, "?")
    with db.read() as conn:
        count, oldest = conn.exec_driver_sql(text, tuple(params)).one()
    return int(count), datetime.fromisoformat(oldest) if oldest else None


def create_ingress_log(db: Database) -> PostgresIngressLog | SqliteIngressLog:
    return PostgresIngressLog(db) if db.backend == "postgresql" else SqliteIngressLog(db)


def erase_member(db: Database, user_id: str, before: datetime) -> int:
    """Forget-me: delete the member's events that occurred by ``before`` from every live
    day partition; on PostgreSQL their dedup keys too (an event id may carry the user's
    data; the forget marker refuses a resend of them while it lives)."""
    with db.write() as conn:
        if db.backend == "postgresql":
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
        result = conn.execute(
            sa.text("DELETE FROM ingress_events WHERE user_id = :u AND occurred_at <= :t"),
            {"u": user_id, "t": sqlite_timestamp(before)},
        )
        return int(result.rowcount)
